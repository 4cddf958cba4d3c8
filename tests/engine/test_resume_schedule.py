"""Resuming against the schedule and the data order: lengths given in epochs, another seed or split inside an
epoch (test_resume.py holds the exactness and the other refusals)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sak.engine import train
from sak.engine.checkpoint import CheckpointError, latest_checkpoint


@pytest.mark.parametrize(
    ("length", "named"),
    [
        (["schedule.max_steps=null", "schedule.epochs=2", "schedule.warmup_steps=0"], "schedule.epochs are counted"),
        (
            ["schedule.max_steps=16", "schedule.warmup_steps=0", "schedule.warmup_epochs=0.5"],
            "schedule.warmup_epochs are counted",
        ),
    ],
)
def test_a_schedule_in_epochs_refuses_another_batch_size_even_at_an_epochs_end(length, named, tiny_recipe):
    """8 steps an epoch of batch 4: 2 epochs are 16 steps. Resumed at the end of epoch 1 with batch 8 (4 steps an
    epoch), the 8 steps done made the 2-epoch run finished at once; with batch 2 it trained 5 epochs' data, its
    learning rate rising again. Steps-only schedules may change there (test_resume.py)."""
    train(tiny_recipe(*length, "run.stop_at=8"))
    for batch in (8, 2):
        with pytest.raises(CheckpointError, match=rf"with another data.batch_size \(data.batch_size: 4 -> {batch}\): "
                           rf"{named} in optimiser steps.* the 8 steps done"):  # fmt: skip
            train(tiny_recipe(*length, f"data.batch_size={batch}"))
    with pytest.raises(CheckpointError, match="with another optim.grad_accum"):
        train(tiny_recipe(*length, "optim.grad_accum=2"))


def test_another_seed_or_split_is_refused_inside_an_epoch_and_taken_at_its_end(tiny_recipe):
    """The place in an epoch counts batches of the checkpoint's permutation of its samples: resumed with another
    run.seed three batches in, the rest of the epoch repeated some samples and skipped others."""
    common = ["schedule.max_steps=10", "schedule.warmup_steps=0"]
    train(tiny_recipe(*common, "run.stop_at=3"))
    for change, key in (("run.seed=7", "run.seed"), ("data.split=val", "data.split")):
        with pytest.raises(CheckpointError, match=rf"with another {key} .*it stopped 3 batch\(es\) into epoch 0 of "
                           "the checkpoint's order of samples"):  # fmt: skip
            train(tiny_recipe(*common, change))
    train(tiny_recipe(*common, "run.stop_at=8"))  # the epoch's end: the next epoch is drawn with the new seed
    recipe = tiny_recipe(*common, "run.seed=7")
    train(recipe)
    assert latest_checkpoint(recipe.run_dir / "checkpoints").name == "step_00000010"


def test_another_training_split_by_any_setting_is_refused_inside_an_epoch(tiny_recipe):
    """Only run.seed / data.name / split / subset were checked: another data.options (here the generated split's
    length; for a folder, data.root or images added) resumed 2 batches into a reshuffled epoch, training some
    samples twice in it. With a schedule in epochs another size is refused at an epoch's end too."""
    common = ["schedule.max_steps=12", "schedule.warmup_steps=0"]
    train(tiny_recipe(*common, "run.stop_at=2"))
    with pytest.raises(CheckpointError, match=r"with another training split \(32 samples, ids sha256 [0-9a-f]{12} -> "
                       r"64 samples, ids sha256 [0-9a-f]{12}; .*it stopped 2 batch\(es\) into epoch 0"):  # fmt: skip
        train(tiny_recipe(*common, "data.options.length=64"))
    train(tiny_recipe(*common, "run.stop_at=8"))  # the epoch's end, a schedule in steps: it may change there
    recipe = tiny_recipe(*common, "data.options.length=64")
    train(recipe)
    assert latest_checkpoint(recipe.run_dir / "checkpoints").name == "step_00000012"
    epochs = ["schedule.max_steps=null", "schedule.epochs=2", "schedule.warmup_steps=0"]
    train(tiny_recipe(*epochs, "run.name=epochs", "run.stop_at=8"))
    with pytest.raises(CheckpointError, match=r"a training split of another size \(32 samples.* -> 16 samples.*\): "
                       "schedule.epochs are counted in optimiser steps"):  # fmt: skip
        train(tiny_recipe(*epochs, "run.name=epochs", "data.options.length=16"))


def test_a_finished_run_trained_on_no_longer_claims_its_final_metrics(tiny_recipe):
    """Finished at step 4, then given 8 steps and stopped at 6: final_metrics.json beside the run still held the
    4-step metrics, as if it had finished. It is taken away (the step-4 checkpoint keeps its copy), set aside
    with the later checkpoints when a resume from an earlier one abandons them, and written at the new end."""
    import json

    recipe = tiny_recipe("schedule.max_steps=4")
    train(recipe)
    final = recipe.run_dir / "final_metrics.json"
    four = json.loads(final.read_text())
    train(tiny_recipe("schedule.max_steps=8", "run.stop_at=6"))
    assert not final.exists()
    assert json.loads((recipe.run_dir / "checkpoints" / "step_00000004" / "final_metrics.json").read_text()) == four
    train(tiny_recipe("schedule.max_steps=8"))
    assert final.is_file()
    resumed = tiny_recipe("schedule.max_steps=8", f"checkpoint.resume={recipe.run_dir / 'checkpoints' / 'step_00000006'}",
                          "run.stop_at=7")  # fmt: skip
    train(resumed)
    assert not final.exists()
    assert [p.name for p in recipe.run_dir.glob("checkpoints/abandoned-*/final_metrics.json")] == ["final_metrics.json"]


def test_final_metrics_a_checkpoint_of_an_older_sak_lacks_are_kept_not_deleted(tiny_recipe):
    """Final checkpoints of sak before 2026-11-27 hold no final_metrics.json: the copy beside the run is the only
    one, and a start that trains on must not delete it (it is renamed aside)."""
    import json

    recipe = tiny_recipe("schedule.max_steps=4")
    train(recipe)
    step4 = recipe.run_dir / "checkpoints" / "step_00000004"
    four = json.loads((step4 / "final_metrics.json").read_text())
    (step4 / "final_metrics.json").unlink()  # as an older sak saved it
    train(tiny_recipe("schedule.max_steps=8", "run.stop_at=6"))
    assert not (recipe.run_dir / "final_metrics.json").exists()
    (kept,) = recipe.run_dir.glob("final_metrics.json.before-*")
    assert json.loads(kept.read_text()) == four and not (step4 / "final_metrics.json").exists()


def test_resuming_from_a_run_directory_names_its_latest_checkpoint(tiny_recipe, tmp_path):
    recipe = tiny_recipe("schedule.max_steps=2")
    train(recipe)
    other = tiny_recipe("schedule.max_steps=4", "run.name=other", f"checkpoint.resume={recipe.run_dir}")
    with pytest.raises(FileNotFoundError, match=rf"{recipe.run_dir} is not a complete sak checkpoint \(no "
                       rf"trainer_state.json\); it holds checkpoints: give one, e.g. checkpoint.resume="
                       rf"{recipe.run_dir / 'checkpoints' / 'step_00000002'}"):  # fmt: skip
        train(other)
    with pytest.raises(FileNotFoundError, match=r"\(no trainer_state.json\)$"):  # nothing to name
        train(tiny_recipe("run.name=third", f"checkpoint.resume={tmp_path}"))


def test_another_runs_final_checkpoint_resumed_brings_its_recipe_beside_its_metrics(tiny_recipe):
    """Run b given run a's final checkpoint trains nothing and returns a's final metrics: b's folder got a's
    final_metrics.json but no recipe.yaml, so nothing beside them said what made them."""
    import json

    a = tiny_recipe("schedule.max_steps=2", "run.name=a")
    train(a)
    final = a.run_dir / "checkpoints" / "step_00000002"
    b = tiny_recipe("schedule.max_steps=2", "run.name=b", "optim.lr=0.5", f"checkpoint.resume={final}")
    train(b)
    assert json.loads((b.run_dir / "final_metrics.json").read_text()) == json.loads(
        (final / "final_metrics.json").read_text()
    )
    assert (b.run_dir / "recipe.yaml").read_text() == (final / "recipe.yaml").read_text()  # a's, lr and all
    assert (b.run_dir / "teachers.json").read_text() == (final / "teachers.json").read_text()  # and its teachers


def test_a_final_evaluation_that_fails_keeps_the_trained_steps(tiny_recipe, monkeypatch, capsys):
    """With checkpoint.every 0 (the default) the only checkpoint was written after the final evaluation: one that
    ran out of memory, or was killed, lost every step; the next start trained from step 0."""
    from sak.engine import trainer

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("simulated out of memory in the final evaluation")

    recipe = tiny_recipe("schedule.max_steps=6")
    real = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", out_of_memory)
    with pytest.raises(RuntimeError, match="simulated"):
        train(recipe)
    last = latest_checkpoint(recipe.run_dir / "checkpoints")
    assert last is not None and last.name == "step_00000006" and not (last / "final_metrics.json").exists()
    assert not (recipe.run_dir / "final_metrics.json").exists()
    monkeypatch.setattr(trainer, "evaluate", real)
    capsys.readouterr()
    # evaluates again, trains nothing, and adds the metrics to that checkpoint; the training split may have changed
    # (the data moved, say), though the run stopped inside an epoch: no step is trained
    recipe = tiny_recipe("schedule.max_steps=6", "data.options.length=64")
    final = train(recipe)
    assert f"resumed from {last} at step 6" in capsys.readouterr().out
    assert latest_checkpoint(recipe.run_dir / "checkpoints") == last
    assert (last / "final_metrics.json").is_file() and (recipe.run_dir / "final_metrics.json").is_file()
    assert train(recipe) == final  # finished: a start after the end returns the checkpoint's metrics


def test_another_runs_checkpoint_resumed_at_its_end_is_saved_here_before_its_metrics(tiny_recipe, monkeypatch):
    """Resumed at its end from another run's checkpoint without metrics, into a run directory that holds its own
    checkpoint of that step: the metrics of the other run's weights were written into this run's checkpoint,
    which holds other weights."""
    from sak.engine import trainer

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("simulated out of memory in the final evaluation")

    real = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", out_of_memory)
    other = tiny_recipe("schedule.max_steps=4", "run.name=other")
    with pytest.raises(RuntimeError, match="simulated"):
        train(other)
    monkeypatch.setattr(trainer, "evaluate", real)
    foreign = latest_checkpoint(other.run_dir / "checkpoints")
    mine = tiny_recipe("schedule.max_steps=4", "run.name=mine", "run.seed=3")
    train(mine)
    own = latest_checkpoint(mine.run_dir / "checkpoints")
    train(tiny_recipe("schedule.max_steps=4", "run.name=mine", "run.seed=3", f"checkpoint.resume={foreign}"))
    weights = load_file(str(own / "model.safetensors"))
    assert own.name == foreign.name == "step_00000004" and (own / "final_metrics.json").is_file()
    assert all(torch.equal(v, load_file(str(foreign / "model.safetensors"))[k]) for k, v in weights.items())


def test_a_final_evaluation_logged_before_its_metrics_were_saved_is_logged_once(tiny_recipe, monkeypatch):
    """A full disk (or a kill) between the final evaluation's row in metrics.jsonl and its metrics in the final
    checkpoint: the start that evaluates again logged a second row of `val/...` values at the last step."""
    from sak.engine import trainer

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    recipe = tiny_recipe("schedule.max_steps=6")
    real = trainer.add_to_checkpoint
    monkeypatch.setattr(trainer, "add_to_checkpoint", disk_full)
    with pytest.raises(OSError, match="No space"):
        train(recipe)
    monkeypatch.setattr(trainer, "add_to_checkpoint", real)
    train(recipe)
    rows = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    at_end = [r for r in rows if r["step"] == 6]
    assert [any(k.startswith("val/") for k in r) for r in at_end] == [False, True]  # the step's losses, then one
    assert sorted({r["step"] for r in rows if "loss" in r}) == list(range(1, 7))  # evaluation
