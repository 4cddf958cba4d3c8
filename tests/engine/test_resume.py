"""Checkpoints and the run directory across starts: exact resume, saving and setting aside, damaged files named,
recipe changes on resume, and what a finished or stopped run does when started again."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from sak.engine import train
from sak.engine.checkpoint import latest_checkpoint

from .test_train import logged, weights


def test_resume_is_exact(tiny_recipe, tmp_path):
    """8 steps straight == 4 steps, stop, resume, 4 more: same weights and same logged losses."""
    common = ["schedule.max_steps=8", "data.num_workers=0", "student.model_kwargs.drop_path_rate=0.1"]
    straight = tiny_recipe(*common, "run.name=straight")
    train(straight)
    split = tiny_recipe(*common, "run.name=split", "run.stop_at=4")
    assert train(split) == {}
    assert latest_checkpoint(split.run_dir / "checkpoints").name == "step_00000004"
    resumed = tiny_recipe(*common, "run.name=split")
    train(resumed)
    a, b = weights(straight.run_dir), weights(split.run_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    assert logged(straight.run_dir) == logged(split.run_dir)


def test_resuming_at_run_stop_at_trains_nothing_and_says_how_to_go_on(tiny_recipe, capsys):
    """The same command again after a stop used to train one more step (and save it) each time."""
    recipe = tiny_recipe("run.stop_at=2")
    assert train(recipe) == {}
    assert "stopped at step 2 (run.stop_at), checkpoint saved; to go on, resume with a higher run.stop_at" in (
        capsys.readouterr().out
    )
    assert train(recipe) == {}
    assert "at step 2 already, run.stop_at=2: nothing to train" in capsys.readouterr().out
    assert [p.name for p in (recipe.run_dir / "checkpoints").iterdir()] == ["step_00000002"]
    assert sorted(logged(recipe.run_dir)) == [1, 2]
    train(tiny_recipe("run.stop_at=3"))
    assert latest_checkpoint(recipe.run_dir / "checkpoints").name == "step_00000003"


def test_saving_a_step_again_keeps_a_complete_copy_at_every_moment(tiny_recipe, monkeypatch):
    """run.stop_at on a periodic checkpoint's step saves once; a save of a step that exists replaces it by
    renames, and a kill between them is undone by the next start (clean_partials)."""
    import os

    from sak.engine import checkpoint

    recipe = tiny_recipe("checkpoint.every=2", "checkpoint.keep_last=1", "run.stop_at=2")
    saves = []
    real_save = checkpoint.save_checkpoint
    monkeypatch.setattr(
        "sak.engine.trainer.save_checkpoint", lambda *a, **k: saves.append(a[2].step) or real_save(*a, **k)
    )
    train(recipe)
    assert saves == [2]  # the stop did not save step 2 a second time
    root = recipe.run_dir / "checkpoints"
    kept = latest_checkpoint(root)
    # a second save of step 2, killed right after the old copy was set aside
    real_replace, calls = os.replace, []

    def killed(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    from accelerate import Accelerator

    state = checkpoint.TrainState(step=2)
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(1, 1))
    monkeypatch.setattr(checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(accelerator, root, state, {}, keep_last=1)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert latest_checkpoint(root) is None  # step 2 is set aside, its replacement never arrived...
    checkpoint.clean_partials(root)
    assert latest_checkpoint(root) == kept and (kept / "model.safetensors").is_file()  # ...and is put back
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint_that_looks_complete(tiny_recipe, monkeypatch):
    """Pruning deleted a checkpoint in place: killed half way, the folder kept its trainer_state.json with files
    gone, and was taken for a complete checkpoint (the one a damaged latest checkpoint's error points to)."""
    import shutil

    from sak.engine import checkpoint

    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):
        if str(path).endswith(checkpoint.PRUNED):
            (Path(path) / "model.safetensors").unlink()  # part of the way, then the kill
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    recipe = tiny_recipe("checkpoint.every=1", "checkpoint.keep_last=1", "schedule.max_steps=3")
    with pytest.raises(KeyboardInterrupt):
        train(recipe)
    root = recipe.run_dir / "checkpoints"
    assert [p.name for p in checkpoint.checkpoint_dirs(root)] == ["step_00000002"]
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    checkpoint.clean_partials(root)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]


def test_a_fresh_run_sets_another_runs_checkpoints_aside(tiny_recipe):
    """resume: never in a run directory with checkpoints: they are moved out of the new run's way (not
    deleted), so pruning keeps the new run's own and resume: auto continues the new run."""
    train(tiny_recipe("schedule.max_steps=6", "checkpoint.every=2", "checkpoint.keep_last=2"))
    recipe = tiny_recipe("schedule.max_steps=6", "checkpoint.every=2", "checkpoint.resume=never", "run.stop_at=2")
    train(recipe)
    root = recipe.run_dir / "checkpoints"
    assert latest_checkpoint(root).name == "step_00000002"
    (aside,) = [p for p in root.iterdir() if p.name.startswith("previous-")]
    assert sorted(p.name for p in aside.iterdir()) == [
        "final_metrics.json",
        "metrics.jsonl",
        "step_00000004",
        "step_00000006",
    ]


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="platform: no /dev/shm, a second file system")
def test_checkpoints_on_another_disk_take_the_logs_they_are_set_aside_with(tiny_recipe, tmp_path):
    """checkpoints/ a link to another file system: os.rename of metrics.jsonl into it failed (EXDEV) after the
    checkpoints had moved, and the next fresh start overwrote the earlier run's metrics.jsonl."""
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as elsewhere:
        recipe = tiny_recipe("schedule.max_steps=2")
        recipe.run_dir.mkdir(parents=True)
        (recipe.run_dir / "checkpoints").symlink_to(elsewhere)
        train(recipe)
        lines = (recipe.run_dir / "metrics.jsonl").read_text()
        train(tiny_recipe("schedule.max_steps=2", "checkpoint.resume=never"))
        (aside,) = Path(elsewhere).glob("previous-*")
        assert (aside / "metrics.jsonl").read_text() == lines and (aside / "final_metrics.json").is_file()
        assert sorted(p.name for p in aside.iterdir()) == ["final_metrics.json", "metrics.jsonl", "step_00000002"]


def test_a_torn_last_metrics_line_does_not_stop_a_resume(tiny_recipe):
    recipe = tiny_recipe("checkpoint.every=2", "run.stop_at=4")
    train(recipe)
    with open(recipe.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # killed mid-line
    train(tiny_recipe("checkpoint.every=2"))
    assert sorted(logged(recipe.run_dir)) == list(range(1, 9))


def test_metrics_jsonl_is_replaced_whole_when_a_start_drops_lines_and_left_alone_otherwise(tiny_recipe, monkeypatch):
    """It was emptied and written again on every start: a kill during that write lost the run's history."""
    recipe = tiny_recipe("checkpoint.every=2", "run.stop_at=4")
    train(recipe)
    path = recipe.run_dir / "metrics.jsonl"
    replace = os.replace

    def killed(src, dst):  # (every other file renamed as before)
        if Path(dst).name == "metrics.jsonl":
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    train(recipe)  # at run.stop_at already: nothing to drop, the file is not written
    with open(path, "a") as f:  # a line edited by hand (its step a string: a TypeError), then one killed mid-line
        f.write('{"step": "x"}\n{"step": 5, "loss": 1.2')  # both dropped by the next start
    before = path.read_text()
    with pytest.raises(KeyboardInterrupt):
        train(tiny_recipe("checkpoint.every=2"))
    assert path.read_text() == before
    monkeypatch.undo()
    train(tiny_recipe("checkpoint.every=2"))
    assert sorted(logged(recipe.run_dir)) == list(range(1, 9))


def test_a_partial_evaluation_does_not_move_the_accumulation_boundaries(tiny_recipe):
    """3 batches an epoch, grad_accum 2, an evaluation of 1 batch after every step: each step takes the same
    micro-batches as without evaluation (an evaluation stopped early used to leave its loader registered with
    Accelerate, which then missed the training epoch's end and made a step span two epochs)."""
    common = ["data.options.length=12", "optim.grad_accum=2", "schedule.max_steps=4", "logging.sample_ids=true",
              "eval.every=1", "schedule.warmup_steps=0"]  # fmt: skip
    steps = {}
    for batches in (0, 1):
        recipe = tiny_recipe(f"run.name=eval{batches}", f"eval.batches={batches}", *common)
        train(recipe)
        rows = [json.loads(x) for x in (recipe.run_dir / "samples" / "rank0.jsonl").read_text().splitlines()]
        steps[batches] = [r["step"] for r in rows]
    assert steps[1] == steps[0] == [1, 1, 2, 3, 3, 4], steps


def test_the_git_revision_is_this_checkouts_and_none_for_a_copy_inside_another_repository(tmp_path):
    """A copy of sak installed inside another project's repository must not report that project's revision."""
    import shutil
    import subprocess
    import sys

    from sak.engine.logging import git_revision
    from tests.conftest import REPO

    if (REPO / ".git").exists():  # a checkout (CI clones one): its own revision
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        assert git_revision().split("+")[0] == head
    other = tmp_path / "project"
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    git = ["git", "-C", str(other), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "other project"], check=True)
    shutil.copytree(REPO / "sak", other / "venv" / "sak")
    code = "from sak.engine.logging import git_revision; print(git_revision())"
    out = subprocess.run([sys.executable, "-c", code], cwd=other / "venv", capture_output=True, text=True)
    assert out.stdout.strip() == "None", out.stderr[-2000:]
    # tracked there: its revision, "+dirty" for a changed tracked file only (results written in the checkout,
    # as the README's `sak eval --out results.json` does, are no change to the code)
    subprocess.run([*git, "add", "venv/sak"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "sak"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (other / "results.json").write_text("{}")
    out = subprocess.run([sys.executable, "-c", code], cwd=other / "venv", capture_output=True, text=True)
    assert out.stdout.strip() == head, out.stderr[-2000:]
    with open(other / "venv" / "sak" / "__init__.py", "a") as f:
        f.write("\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=other / "venv", capture_output=True, text=True)
    assert out.stdout.strip() == head + "+dirty", out.stderr[-2000:]


def test_resuming_into_another_student_is_one_error_naming_the_misfit_and_the_changes(tiny_recipe, capsys):
    """Not accelerate's load_state RuntimeError with a line per tensor: what does not fit, and which recipe
    values changed since the checkpoint."""
    train(tiny_recipe("checkpoint.every=2", "run.stop_at=2"))
    with pytest.raises(ValueError) as exc:
        train(tiny_recipe("checkpoint.every=2", "student.model_kwargs.embed_dim=48"))
    message = str(exc.value)
    assert message.startswith("cannot resume from ") and "step_00000002" in message
    assert "size mismatch for stem.vit.cls_token" in message and "student.model_kwargs.embed_dim: 32 -> 48" in message
    assert "Start a new run instead" in message and "\n" not in message


def test_a_refused_resume_leaves_the_runs_recipe_as_it_was(tiny_recipe):
    """recipe.yaml and run_info.json describe the start that trained: a resume refused (here, another student)
    does not overwrite them, so `sak export <run>/recipe.yaml` still builds the student of its weights."""
    recipe = tiny_recipe("checkpoint.every=2", "run.stop_at=2")
    train(recipe)
    files = {name: (recipe.run_dir / name).read_text() for name in ("recipe.yaml", "run_info.json", "starts.jsonl")}
    with pytest.raises(ValueError, match="cannot resume from"):
        train(tiny_recipe("checkpoint.every=2", "student.model_kwargs.embed_dim=48"))
    assert {name: (recipe.run_dir / name).read_text() for name in files} == files


def test_an_optimiser_state_of_other_trainable_parameters_is_a_misfit_not_a_damaged_file(tiny_recipe):
    """student.freeze=stem leaves other parameter groups: the optimiser's load_state_dict ValueError was reported
    as a damaged file, with advice to resume from an earlier checkpoint, which fails alike."""
    train(tiny_recipe("checkpoint.every=2", "run.stop_at=2"))
    with pytest.raises(ValueError) as exc:
        train(tiny_recipe("checkpoint.every=2", "student.freeze=stem"))
    message = str(exc.value)
    assert "its optimiser state does not fit this recipe's trainable parameters" in message
    assert "student.freeze: 'none' -> 'stem'" in message and "damaged" not in message


def test_a_resume_with_other_optimiser_settings_trains_with_them(tiny_recipe):
    """The optimiser's state_dict brings back the saved run's lr, weight decay, betas and eps, and the
    scheduler's its base learning rates: without putting the recipe's back, steps 3-8 ran at lr 1e-3 while
    recipe.yaml and starts.jsonl said 1e-5."""
    common = ["checkpoint.every=2", "schedule.name=constant", "schedule.warmup_steps=0"]
    recipe = tiny_recipe(*common, "run.stop_at=2")
    train(recipe)
    changed = [*common, "optim.lr=1.0e-5", "optim.weight_decay=0.5", "optim.betas=[0.8, 0.9]", "optim.eps=1.0e-6",
               "optim.fused=false"]  # fmt: skip
    train(tiny_recipe(*changed))
    rows = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == [1e-3] * 2 + [1e-5] * 6
    saved = torch.load(recipe.run_dir / "checkpoints" / "step_00000008" / "optimizer.bin", weights_only=True)
    keys = ("lr", "initial_lr", "weight_decay", "betas", "eps", "fused")
    groups = [{k: g[k] for k in keys} for g in saved["param_groups"]]
    assert groups == [
        {"lr": 1e-5, "initial_lr": 1e-5, "weight_decay": wd, "betas": (0.8, 0.9), "eps": 1e-6, "fused": None}
        for wd in (0.5, 0.0)
    ]
    # and back on: the fused kernel takes the step counts the unfused run saved
    train(tiny_recipe(*common, "schedule.max_steps=10"))
    saved = torch.load(recipe.run_dir / "checkpoints" / "step_00000010" / "optimizer.bin", weights_only=True)
    assert [g["fused"] for g in saved["param_groups"]] == [True, True]
    assert all(float(s["step"]) == 10 for s in saved["state"].values())


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.bin", "trainer_state.json", "random_states_0.pkl"])
def test_a_damaged_checkpoint_is_named_with_the_one_before_to_resume_from(victim, tiny_recipe):
    """A file of the latest checkpoint cut short (a disk fault, a copy that stopped): one error naming the
    checkpoint, what could not be read and the earlier checkpoint, which then resumes."""
    from sak.engine.checkpoint import CheckpointError

    common = ["checkpoint.every=1", "checkpoint.keep_last=2", "schedule.max_steps=3"]
    train(tiny_recipe(*common, "run.stop_at=2"))
    ckpts = tiny_recipe(*common).run_dir / "checkpoints"
    file = ckpts / "step_00000002" / victim
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    with pytest.raises(CheckpointError) as exc:
        train(tiny_recipe(*common))
    message = str(exc.value)
    assert message.startswith(f"cannot resume from {ckpts / 'step_00000002'}: a file of it is damaged or unreadable (")
    assert f"checkpoint.resume={ckpts / 'step_00000001'}" in message and "\n" not in message
    train(tiny_recipe(*common, f"checkpoint.resume={ckpts / 'step_00000001'}"))
    assert 3 in logged(tiny_recipe(*common).run_dir) and (ckpts / "step_00000003").is_dir()


def test_resuming_with_loss_normalize_turned_on_since_is_named(tiny_recipe):
    from sak.engine.checkpoint import CheckpointError

    common = ["checkpoint.every=1", "schedule.max_steps=3"]
    train(tiny_recipe(*common, "run.stop_at=1"))
    with pytest.raises(CheckpointError, match="holds no target statistics, as its run had loss.normalize none"):
        train(tiny_recipe(*common, "loss.normalize=standardize"))


def test_resuming_with_another_loss_normalize_mode_is_named_not_called_damaged(tiny_recipe):
    """standardize keeps per-channel squares, phi_s a covariance: loading one into the other was reported as a
    damaged file, with advice to resume from the checkpoint before, which fails alike."""
    from sak.engine.checkpoint import CheckpointError

    common = ["checkpoint.every=1", "schedule.max_steps=3"]
    train(tiny_recipe(*common, "run.stop_at=1", "loss.normalize=standardize"))
    with pytest.raises(CheckpointError) as exc:
        train(tiny_recipe(*common, "loss.normalize=phi_s"))
    message = str(exc.value)
    assert "its target statistics do not fit this recipe's loss.normalize (size mismatch for" in message
    assert "loss.normalize: 'standardize' -> 'phi_s'" in message and "damaged" not in message


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(tiny_recipe, capsys):
    """Pruning keeps the highest steps: after a resume from step 2 of a run that reached step 6, it used to
    delete the new step-4 checkpoint and keep the abandoned step 6, which `resume: auto` then continued."""
    common = ["schedule.max_steps=10", "checkpoint.every=2"]
    train(tiny_recipe(*common, "run.stop_at=6", "checkpoint.keep_last=3"))
    root = tiny_recipe().run_dir / "checkpoints"
    train(
        tiny_recipe(*common, "run.stop_at=4", "checkpoint.keep_last=1", f"checkpoint.resume={root / 'step_00000002'}")
    )
    assert latest_checkpoint(root).name == "step_00000004"
    (aside,) = [p for p in root.iterdir() if p.name.startswith("abandoned-")]
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000004", "step_00000006"]  # the abandoned line
    assert f"the checkpoints after step 2 in {root} moved to {aside}" in capsys.readouterr().out
    train(tiny_recipe(*common, "checkpoint.keep_last=1"))
    assert sorted(logged(tiny_recipe().run_dir)) == list(range(1, 11))  # one line of training, each step once


def test_a_checkpoint_of_another_number_of_processes_is_refused(tiny_recipe):
    """Each process's place in the epoch and its random states would differ: the resume would repeat data."""
    from sak.engine.checkpoint import CheckpointError

    train(tiny_recipe("run.stop_at=2"))
    ckpt = latest_checkpoint(tiny_recipe().run_dir / "checkpoints")
    (ckpt / "random_states_1.pkl").write_bytes((ckpt / "random_states_0.pkl").read_bytes())  # as 2 processes write
    with pytest.raises(CheckpointError, match=r"this run has 1; an exact resume needs the same number \(`accelerate "
                                              r"launch --multi_gpu --num_processes 2`\)"):  # fmt: skip
        train(tiny_recipe())  # (without --multi_gpu a CPU launch started 1 process)


def test_a_finished_run_started_again_returns_its_final_metrics_and_logs_nothing_new(tiny_recipe, capsys):
    """The metrics come from the final checkpoint (saved with it, in one whole), not from the run directory's
    final_metrics.json, which a fresh start or a kill could leave from another run; a longer schedule trains on."""
    recipe = tiny_recipe("schedule.max_steps=2")
    final = train(recipe)
    lines = (recipe.run_dir / "metrics.jsonl").read_text()
    (recipe.run_dir / "final_metrics.json").write_text('{"val/loss": 1')  # torn, or another run's
    assert train(tiny_recipe("schedule.max_steps=2")) == final
    assert "finished already, at step 2 (final metrics in" in capsys.readouterr().out
    assert (recipe.run_dir / "metrics.jsonl").read_text() == lines
    assert json.loads((recipe.run_dir / "final_metrics.json").read_text()) == final  # the checkpoint's, again
    # started again with a shorter schedule: says so, and recipe.yaml stays the recipe that trained it
    (recipe.run_dir / "final_metrics.json").unlink()  # (a kill between the final checkpoint and this file)
    assert train(tiny_recipe("schedule.max_steps=1")) == final
    out = capsys.readouterr().out
    assert "finished already, at step 2 (this recipe asks for 1)" in out
    assert "recipe.yaml still holds the recipe that trained it" in out and "now holds" not in out  # (it said so)
    assert yaml.safe_load((recipe.run_dir / "recipe.yaml").read_text())["schedule"]["max_steps"] == 2
    assert json.loads((recipe.run_dir / "final_metrics.json").read_text()) == final
    longer = train(tiny_recipe("schedule.max_steps=3"))
    assert sorted(logged(recipe.run_dir)) == [1, 2, 3] and longer != final
    assert json.loads((recipe.run_dir / "final_metrics.json").read_text()) == longer


def test_sample_records_of_steps_lost_to_a_crash_are_dropped_on_resume(tiny_recipe):
    """A run that trained past its last checkpoint and died: the resume trains those steps again, and each
    step's ids are recorded once, as its metrics are. A fresh start sets the old records aside with the
    checkpoints."""
    common = ["schedule.max_steps=4", "checkpoint.every=2", "logging.sample_ids=true"]
    recipe = tiny_recipe(*common, "run.stop_at=3")
    train(recipe)
    root = recipe.run_dir / "checkpoints"
    import shutil

    shutil.rmtree(root / "step_00000003")  # as if killed after step 3, before any checkpoint of it
    records = recipe.run_dir / "samples" / "rank0.jsonl"
    with open(records, "a") as f:
        f.write('{"step": 4, "ids": ["0000')  # and killed while writing a record
    train(tiny_recipe(*common))
    steps = [json.loads(line)["step"] for line in records.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    train(tiny_recipe(*common, "checkpoint.resume=never", "run.stop_at=1"))
    assert [json.loads(line)["step"] for line in records.read_text().splitlines()] == [1]
    (aside,) = [p for p in root.iterdir() if p.name.startswith("previous-")]
    assert (aside / "samples" / "rank0.jsonl").read_text().count("\n") == 4 and (aside / "metrics.jsonl").is_file()


def test_sample_records_are_cut_by_streaming_and_left_alone_when_nothing_is_later(tmp_path):
    """Every start read each samples/ file whole, at twice its size in memory (gigabytes for a long run)."""
    from sak.engine.run_records import _last_record_step, cut_sample_records

    folder = tmp_path / "samples"
    folder.mkdir()
    lines = [json.dumps({"step": s, "ids": [f"im{s}", "x" * 50]}) + "\n" for s in range(1, 6)]
    done, later = folder / "rank0.jsonl", folder / "rank1.jsonl"
    done.write_text("".join(lines[:3]))
    later.write_text("".join(lines) + '{"step": 6, "ids": ["im')  # (a kill mid-record)
    inode = done.stat().st_ino
    cut_sample_records(tmp_path, 3)
    assert done.stat().st_ino == inode  # not rewritten
    assert later.read_text() == "".join(lines[:3])
    assert _last_record_step(later, tail=40) == math.inf  # a last line longer than the tail read: streamed
    assert _last_record_step(later) == 3


def test_a_stage_2_run_resumes_without_its_init_from_source(tiny_recipe, tmp_path):
    """The checkpoint holds the weights once the run has started: the stage-1 run may be gone by then."""
    import shutil

    from ..conftest import TESTS

    TINY_MULTITASK = TESTS / "tiny_multitask.yaml"

    stage1 = tiny_recipe("run.name=stage1", "schedule.max_steps=1")
    train(stage1)
    common = ["run.name=stage2", "schedule.max_steps=3", f"checkpoint.init_from={stage1.run_dir}"]
    train(tiny_recipe(*common, "run.stop_at=2", path=TINY_MULTITASK))
    shutil.rmtree(stage1.run_dir)
    train(tiny_recipe(*common, path=TINY_MULTITASK))
    assert sorted(logged(tmp_path / "stage2")) == [1, 2, 3]


def test_a_damaged_recipe_copy_in_a_checkpoint_is_named(tiny_recipe):
    from sak.engine.checkpoint import CheckpointError

    train(tiny_recipe("run.stop_at=2"))
    ckpt = latest_checkpoint(tiny_recipe().run_dir / "checkpoints")
    for text in ("teachers: [oops", "- a\n- list\n"):
        (ckpt / "recipe.yaml").write_text(text)
        with pytest.raises(CheckpointError, match=f"cannot resume from {ckpt}: a file of it is damaged"):
            train(tiny_recipe())


def test_batch_size_and_grad_accum_change_at_an_epochs_end_and_not_inside_one(tiny_recipe):
    """The place in the epoch counts batches of the checkpoint's size: resumed with batch size 2 three batches of 4
    into the epoch, the run trained some samples twice and skipped others. At an epoch's end (8 batches of 4
    here) the checkpoint records the next epoch's start, so both may change there."""
    from collections import Counter

    from sak.engine.checkpoint import CheckpointError

    common = ["logging.sample_ids=true", "schedule.max_steps=10", "schedule.warmup_steps=0"]
    recipe = tiny_recipe(*common, "run.stop_at=3")
    train(recipe)
    with pytest.raises(CheckpointError) as exc:
        train(tiny_recipe(*common, "data.batch_size=2", "optim.grad_accum=2"))
    message = str(exc.value)
    assert "with another data.batch_size and another optim.grad_accum (data.batch_size: 4 -> 2; " in message
    assert "it stopped 3 batch(es) into epoch 0" in message and "checkpoint.init_from=" in message

    train(tiny_recipe(*common, "run.stop_at=8"))
    state = json.loads((latest_checkpoint(recipe.run_dir / "checkpoints") / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 0)
    train(tiny_recipe(*common, "data.batch_size=2", "optim.grad_accum=2"))
    rows = [json.loads(x) for x in (recipe.run_dir / "samples" / "rank0.jsonl").read_text().splitlines()]
    per_step = Counter()
    for r in rows:
        per_step[r["step"]] += len(r["ids"])
    assert per_step == {**{s: 4 for s in range(1, 9)}, 9: 4, 10: 4}  # steps 9, 10: two micro-batches of 2
    epoch1 = [i for r in rows if r["step"] > 8 for i in r["ids"]]
    assert len(set(epoch1)) == 8  # no sample twice
    # finished mid-epoch: started again with another batch size, it trains nothing and says so (it was refused)
    final = json.loads((recipe.run_dir / "final_metrics.json").read_text())
    assert train(tiny_recipe(*common, "data.batch_size=8")) == pytest.approx(final, nan_ok=True)
