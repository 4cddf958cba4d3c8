"""benchmarks/edge_metric.py: the edge metric's time per image, per dataset's size and tolerance."""

import json

from benchmarks.edge_metric import main


def test_both_datasets_are_timed_and_scored(tmp_path):
    assert main(["--repeats", "1", "--results", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "edge_metric_cpu.json").read_text())
    assert r["command"].startswith("python -m benchmarks.edge_metric --repeats 1 --results")
    assert [(x["dataset"], x["shape"]) for x in r["rows"]] == [("pascal_context", [512, 512]), ("nyud", [448, 576])]
    for x in r["rows"]:
        assert x["median_s"] == x["seconds"][0] > 0 and 90 < x["odsF"] <= 100
    md = (tmp_path / "edge_metric_cpu.md").read_text()
    assert "| pascal_context (0.0075) | 512 x 512 |" in md and "| nyud (0.011) | 448 x 576 |" in md
