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
    # SAK ViT-B's published delta_m is a PASCAL-Context figure: the NYUD-v2 table quoted it too
    assert ("ViT-B's published +0.83" in md) == (dataset == "pascal_context")

    result = json.loads(prefix.with_suffix(".json").read_text())
    (model,) = result["models"]
    assert set(model["tasks"]) == TASKS[dataset] and model["n_images"] == 4
    assert {r["model"] for r in result["published"]} >= {"single-task", "SAK ViT-L"}

    with Image.open(prefix.with_suffix(".png")) as png:
        width, height = png.size
    assert width > 4 * height, "one row per image, image + truth/prediction per task side by side"
    if dataset == "nyud":  # --eval-size is the checkpoint rows' canvas too (it was ignored for them)
        argv = [
            "--fixture",
            "--steps",
            "1",
            "--images",
            "1",
            "--quiet",
            "--eval-size",
            "64",
            "64",
            "--out",
            str(prefix),
        ]
        assert SCRIPTS[dataset].main(argv) == 0
        (model,) = json.loads(prefix.with_suffix(".json").read_text())["models"]
        assert model["resolved_recipe"]["data"]["options"]["eval_size"] == [64, 64]


def test_preds_rows_of_frames_larger_than_the_canvas_are_scored_and_drawn_with_eval_size(tmp_path, monkeypatch):
    """Full 480 x 640 NYUD frames exceed the default 448 x 576 canvas: --eval-size is the canvas of the --preds
    rows and of the picture (which always used the default, and failed after every score was computed, writing
    nothing). The scores are written before the picture is drawn."""
    from sak.data import DatasetSpec, build_dataset
    from sak.data.fixtures import write_nyud
    from sak.data.transforms import unpad
    from sak.engine.predictions import write_predictions

    root = write_nyud(tmp_path / "NYUD_MT", n_train=1, n_val=1, size=(480, 640))
    tasks = ("semseg", "depth", "normals", "edges")
    data = build_dataset("nyud", DatasetSpec(root=str(root), split="val", tasks=tasks, train=False),
                         {"eval_size": [480, 640]})  # fmt: skip
    sample = data[0]
    for task in tasks:  # the ground truth as the predictions: a perfect row
        write_predictions(tmp_path / "preds", task, [sample["id"]], [unpad(sample[task], sample["size"].tolist())])
    prefix = tmp_path / "nyud"
    args = ["--preds", str(tmp_path / "preds"), "--root", str(root), "--images", "1", "--quiet", "--out", str(prefix)]
    assert benchmarks.nyud.main([*args, "--eval-size", "480", "640"]) == 0
    (model,) = json.loads(prefix.with_suffix(".json").read_text())["models"]
    assert model["n_images"] == 1 and model["headline"]["depth"] == 0  # (RMSE of the truth itself)
    assert prefix.with_suffix(".png").is_file()
    # delta_m against the user's single-task scores (the published row is ViT-L's: a ViT-B reproduction's +0.20
    # stood beside the paper's +0.83, measured against ViT-B baselines)
    (tmp_path / "ref.json").write_text('{"depth": 0.5, "semseg": 40.0}')
    assert benchmarks.nyud.main([*args, "--eval-size", "480", "640", "--reference", str(tmp_path / "ref.json")]) == 0
    (model,) = json.loads(prefix.with_suffix(".json").read_text())["models"]
    assert model["reference"] == {"source": "user", "depth": 0.5, "semseg": 40.0}
    assert "against the single-task scores of `--reference`" in prefix.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="--fixture benchmarks its own tiny student"):  # (it scored --preds on it)
        benchmarks.nyud.main([*args, "--fixture"])

    def broken(*args, **kwargs):
        raise RuntimeError("no picture")

    monkeypatch.setattr(benchmarks.dense_common, "picture", broken)
    prefix.with_suffix(".json").unlink()
    with pytest.raises(RuntimeError, match="no picture"):
        benchmarks.nyud.main([*args, "--eval-size", "480", "640"])
    assert prefix.with_suffix(".json").is_file() and prefix.with_suffix(".md").is_file()
