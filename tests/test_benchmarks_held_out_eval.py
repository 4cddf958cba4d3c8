"""benchmarks/held_out_eval.py: evaluations with the teachers run each time, and from their kept outputs."""

import json

from benchmarks.held_out_eval import main
from tests.conftest import TINY


def test_the_three_evaluations_are_timed_and_score_alike(tmp_path):
    assert main(["--recipe", str(TINY), "--repeats", "1", "--results", str(tmp_path), "data.options.length=8"]) == 0
    r = json.loads((tmp_path / "held_out_eval_cpu.json").read_text())
    assert r["same_scores"] is True and r["batches_kept"] == r["batches"] > 0 and r["kept_mib"] > 0
    assert all(len(v) == 1 and v[0] > 0 for v in r["seconds"].values())
    md = (tmp_path / "held_out_eval_cpu.md").read_text()
    assert "| later ones, from the kept outputs |" in md and "score exactly as the recomputing one" in md
