"""The demo's report and its clean-up of earlier demo runs."""

import json

from sak.demo import cosine_table, made_by_the_demo, main

from .conftest import TINY


def test_the_cosine_table_has_a_before_only_from_an_evaluation_before_training():
    """Without eval.at_start the first evaluation was the last one, reported as 'before' with a +0.000 change."""
    rows = [{"step": 2, "val/cosine/a": 0.3}]
    assert "| a | - | 0.300 | - | - |" in cosine_table(rows)
    rows = [{"step": 0, "val/cosine/a": 0.1}, {"step": 2, "loss": 1.0},
            {"step": 2, "val/cosine/a": 0.3, "val/spatial_cosine/a": 0.05}]  # fmt: skip
    assert "| a | 0.100 | 0.300 | +0.200 | 0.050 |" in cosine_table(rows)


def test_the_demo_deletes_only_its_own_earlier_checkpoints(tmp_path, monkeypatch):
    """Pointed at another run's directory with resume never, it deleted that run's checkpoints (and the ones the
    engine had set aside); the engine sets them aside instead."""
    monkeypatch.setattr("sys.argv", ["/repo/sak/demo.py"])  # as `python -m sak.demo` starts (run_info's command)
    run = tmp_path / "precious"
    (run / "checkpoints" / "step_00000500").mkdir(parents=True)
    (run / "checkpoints" / "step_00000500" / "trainer_state.json").write_text('{"step": 500}')
    (run / "starts.jsonl").write_text(json.dumps({"command": ["/venv/bin/sak", "train", "r.yaml"]}) + "\n")
    assert not made_by_the_demo(run)
    common = [f"run.output_dir={tmp_path}", "data.options.length=8", "schedule.max_steps=1", "checkpoint.resume=never"]
    assert main(["--recipe", str(TINY), "run.name=precious", *common]) == 0
    kept = [p.name for p in (run / "checkpoints").iterdir()]
    assert any(name.startswith("previous-") for name in kept), kept  # set aside by the engine, not deleted
    assert made_by_the_demo(tmp_path / "precious") is False  # (its starts.jsonl holds the other command too)
    assert main(["--recipe", str(TINY), "run.name=mine", *common]) == 0
    assert made_by_the_demo(tmp_path / "mine")
    assert main(["--recipe", str(TINY), "run.name=mine", *common]) == 0
    assert not any(p.name.startswith("previous-") for p in (tmp_path / "mine" / "checkpoints").iterdir())


def test_the_demo_reports_a_short_held_out_split_stops_at_stop_at_and_refuses_bad_overrides(tmp_path, capsys):
    """A held-out batch of 3 images crashed the feature grid (it drew 4 rows); run.stop_at crashed the
    report (no final evaluation); a misspelt key printed a traceback."""
    common = ["--recipe", str(TINY), f"run.output_dir={tmp_path}", "schedule.max_steps=2", "eval.batches=1"]
    small = ["data.options.length=3", "data.batch_size=3", "eval.batch_size=3"]
    assert main([*common, "run.name=small", *small]) == 0
    assert (tmp_path / "small" / "report" / "features.png").is_file()
    assert main([*common, "run.name=stopped", "run.stop_at=1"]) == 0
    assert "stopped before the end (run.stop_at): no report" in capsys.readouterr().out
    assert not (tmp_path / "stopped" / "report").exists()
    assert main([*common, "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sak: ") and "optim.lrr" in err and "Traceback" not in err
