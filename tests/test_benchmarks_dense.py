"""The dense benchmark scripts end to end on the fixture: table with the published rows, JSON, picture."""

import json

import pytest
from PIL import Image

import benchmarks.nyud
import benchmarks.pascal_context

COLUMNS = {
    "pascal_context": "| model | params | semseg mIoU | parts mIoU | sal maxF | normals mErr | bound odsF | delta_m % |",
    "nyud": "| model | params | semseg mIoU | depth RMSE | normals mErr | bound odsF | delta_m % |",
}
TASKS = {
    "pascal_context": {"semseg", "parts", "saliency", "normals", "edges"},
    "nyud": {"semseg", "depth", "normals", "edges"},
}
SCRIPTS = {"pascal_context": benchmarks.pascal_context, "nyud": benchmarks.nyud}


@pytest.mark.parametrize("dataset", ["pascal_context", "nyud"])
def test_fixture_benchmark_writes_table_json_and_picture(dataset, tmp_path):
    prefix = tmp_path / f"{dataset}_fixture"
    assert SCRIPTS[dataset].main(["--fixture", "--steps", "2", "--images", "2", "--quiet", "--out", str(prefix)]) == 0

    md = prefix.with_suffix(".md").read_text()
    assert COLUMNS[dataset] in md
    assert "Pipeline check, not a result" in md
    ours = [line for line in md.splitlines() if "(ours)" in line]
    assert len(ours) == 1 and "—" not in ours[0].split("|")[3], "our row has a number in every task column"
    assert "| SAK ViT-L (published) |" in md and "| single-task (published) |" in md

    result = json.loads(prefix.with_suffix(".json").read_text())
    (model,) = result["models"]
    assert set(model["tasks"]) == TASKS[dataset] and model["n_images"] == 4
    assert {r["model"] for r in result["published"]} >= {"single-task", "SAK ViT-L"}

    with Image.open(prefix.with_suffix(".png")) as png:
        width, height = png.size
    assert width > 4 * height, "one row per image, image + truth/prediction per task side by side"
