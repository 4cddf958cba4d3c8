"""Saving checkpoints when the run directory holds leftovers that cannot be deleted (a file another program holds
open on NFS, a busy mount): the save goes on, the last good checkpoint stays, and the next start cleans up."""

import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from sak.engine import checkpoint
from sak.engine.checkpoint import TrainState, checkpoint_dirs, clean_partials, save_checkpoint


@pytest.fixture
def accelerator():
    acc = Accelerator(cpu=True)
    acc.prepare(torch.nn.Linear(2, 2))
    return acc


@pytest.fixture
def undeletable(monkeypatch):
    """Folders named here keep their files through `shutil.rmtree(..., ignore_errors=True)`, as an NFS
    `.nfsXXXX` file does while another program holds it open."""
    held = set()
    real_rmtree = shutil.rmtree

    def rmtree(path, ignore_errors=False, **kwargs):
        if str(path) in held:
            if ignore_errors:
                return
            raise OSError(16, "Device or resource busy", str(path))
        return real_rmtree(path, ignore_errors=ignore_errors, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    yield held
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)


def leftover(path):
    path.mkdir(parents=True)
    (path / ".nfs0001").write_text("held open")
    return path


def test_a_leftover_being_pruned_that_cannot_be_deleted_does_not_stop_the_save(accelerator, undeletable, tmp_path):
    """Pruning renamed the old checkpoint onto `step_N.pruned`; a non-empty folder of that name left by an earlier
    run made the rename fail (ENOTEMPTY) and the run died at the save."""
    root = tmp_path / "checkpoints"
    undeletable.add(str(leftover(root / "step_00000001.pruned")))
    for step in (1, 2):
        save_checkpoint(accelerator, root, TrainState(step=step), {}, keep_last=1)
    assert [p.name for p in checkpoint_dirs(root)] == ["step_00000002"]
    assert (root / "step_00000001.1.pruned" / ".nfs0001").is_file()  # moved out of the way, not lost track of
    undeletable.clear()
    clean_partials(root)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]


def test_a_leftover_of_a_replaced_save_that_cannot_be_deleted_does_not_stop_saving_the_step_again(
    accelerator, undeletable, tmp_path
):
    root = tmp_path / "checkpoints"
    undeletable.add(str(leftover(root / "step_00000003.replaced")))
    save_checkpoint(accelerator, root, TrainState(step=3), {"note.txt": "periodic"}, keep_last=2)
    save_checkpoint(accelerator, root, TrainState(step=3), {"note.txt": "final"}, keep_last=2)
    assert [p.name for p in checkpoint_dirs(root)] == ["step_00000003"]
    assert (root / "step_00000003" / "note.txt").read_text() == "final"
    undeletable.clear()
    clean_partials(root)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]


def refuse_replace_to(suffix: str, monkeypatch):
    """os.replace onto a name ending in `suffix` fails as on a file system that refuses it; returns the real one."""
    real_replace = checkpoint.os.replace

    def replace(src, dst):
        if str(dst).endswith(suffix):
            raise PermissionError(13, "Permission denied", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    return real_replace


def test_a_checkpoint_that_cannot_be_moved_out_is_kept_with_a_warning(accelerator, monkeypatch, tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(accelerator, root, TrainState(step=1), {}, keep_last=1)
    real_replace = refuse_replace_to(checkpoint.PRUNED, monkeypatch)
    with pytest.warns(RuntimeWarning, match="could not prune the checkpoint .*step_00000001.*it is kept"):
        save_checkpoint(accelerator, root, TrainState(step=2), {}, keep_last=1)
    assert [p.name for p in checkpoint_dirs(root)] == ["step_00000001", "step_00000002"]
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    save_checkpoint(accelerator, root, TrainState(step=3), {}, keep_last=1)  # pruned at the next save
    assert [p.name for p in checkpoint_dirs(root)] == ["step_00000003"]


def test_a_step_that_cannot_be_saved_again_keeps_its_earlier_save_with_a_warning(accelerator, monkeypatch, tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(accelerator, root, TrainState(step=3), {"note.txt": "periodic"}, keep_last=2)
    refuse_replace_to(checkpoint.REPLACED, monkeypatch)
    with pytest.warns(RuntimeWarning, match="could not replace .*step_00000003.*its earlier save is kept"):
        save_checkpoint(accelerator, root, TrainState(step=3), {"note.txt": "final"}, keep_last=2)
    assert (root / "step_00000003" / "note.txt").read_text() == "periodic"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]


def test_the_checkpoints_folder_is_flushed_after_the_rename_and_before_pruning(accelerator, monkeypatch, tmp_path):
    """After a power loss, a file system that does not keep a rename and a later delete in order could lose both
    the new checkpoint (its rename not on disk) and the one pruning deleted."""
    root, events = tmp_path / "checkpoints", []
    save_checkpoint(accelerator, root, TrainState(step=1), {}, keep_last=1)
    fsync_dir, prune = checkpoint._fsync_dir, checkpoint._prune
    monkeypatch.setattr(checkpoint, "_fsync_dir", lambda path: events.append(("fsync", path.name)) or fsync_dir(path))
    monkeypatch.setattr(checkpoint, "_prune", lambda *args: events.append(("prune",)) or prune(*args))
    save_checkpoint(accelerator, root, TrainState(step=2), {}, keep_last=1)
    assert events[-2:] == [("fsync", "checkpoints"), ("prune",)]
    assert [p.name for p in checkpoint_dirs(root)] == ["step_00000002"]


def test_checkpoints_set_aside_twice_in_one_second_go_to_two_folders(tmp_path):
    """Two `resume: never` starts in one UTC second: the second's mkdir of previous-<time> was a FileExistsError."""
    for step in (1, 2):
        (tmp_path / f"step_{step:08d}").mkdir()
        (tmp_path / f"step_{step:08d}" / "trainer_state.json").write_text("{}")
        aside = checkpoint.set_aside(tmp_path, "previous-20261130-061500")
        assert aside.name == ("previous-20261130-061500" if step == 1 else "previous-20261130-061500-2")
        assert [p.name for p in aside.iterdir()] == [f"step_{step:08d}"]


def test_a_kill_while_a_start_writes_the_runs_recipe_leaves_the_one_before_whole(tiny_recipe, monkeypatch):
    """recipe.yaml and run_info.json beside the run were written in place: a kill (here, an error half-way through
    the write) left half a file, which `benchmarks.nyud` / `pascal_context` read as the run's recipe."""

    from sak.engine import run_records

    recipe = tiny_recipe()
    recipe.run_dir.mkdir(parents=True)
    (recipe.run_dir / "recipe.yaml").write_text("the recipe of the start before\n")
    write_text = Path.write_text

    def killed(self, text, *args, **kwargs):
        if "recipe.yaml" in self.name:
            write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", killed)
    extra = {"recipe.yaml": recipe.to_yaml(), "run_info.json": "{}", "teachers.json": "{}"}
    with pytest.raises(KeyboardInterrupt):
        run_records.record_start(recipe, None, 0, extra, None)
    assert (recipe.run_dir / "recipe.yaml").read_text() == "the recipe of the start before\n"


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 356480 vs 356368"),
        SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
        RuntimeError("some other failure"),  # (not said to be a full disk)
    ],
)
def test_a_checkpoint_that_cannot_be_written_is_named_and_the_last_good_one_stays(tiny_recipe, monkeypatch, error):
    """A full disk at the second save was torch's "unexpected pos" traceback; the half-written folder stayed,
    holding the space. Now the error names the checkpoint and the last good one, and the partial folder is gone."""
    from sak.engine import train

    saves = {"n": 0}
    real = Accelerator.save_state

    def full_disk(self, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            raise error
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    recipe = tiny_recipe("schedule.max_steps=4", "checkpoint.every=2")
    disk = "other" not in str(error)
    said = r"; a full disk or quota\); the last complete one, .*step_00000002, is as it was: free space" if disk else (
        r"\); the last complete one, .*step_00000002, is as it was$")  # fmt: skip
    with pytest.raises(OSError, match=rf"^cannot write checkpoint step_00000004.partial in .*\({type(error).__name__}: "
                       rf".*{said}"):  # fmt: skip
        train(recipe)  # (no "[Errno 0]" before it)
    assert [p.name for p in (recipe.run_dir / "checkpoints").iterdir()] == ["step_00000002"]


def test_a_checkpoint_folder_that_cannot_be_made_is_named_as_a_failed_save(tiny_recipe, monkeypatch):
    """checkpoints/ read-only (the run directory writable): its partial folder was made outside the save's error
    handling, a bare PermissionError without the last good checkpoint."""
    from sak.engine import train

    mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name == "step_00000004.partial":
            raise PermissionError(13, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(OSError, match=r"^\[Errno 13\] cannot write checkpoint step_00000004.partial in .*"
                       r"\(PermissionError: .*\); the last complete one, .*step_00000002, is as it was$"):  # fmt: skip
        train(tiny_recipe("schedule.max_steps=4", "checkpoint.every=2"))


def test_a_run_that_ends_in_a_nonfinite_streak_prunes_no_good_checkpoint(tiny_recipe):
    """The final save pruned with keep_last although the run was in a non-finite streak (no periodic save is
    made in one): resumed from NaN weights, it deleted the last good checkpoint and kept only NaN ones."""
    from sak.engine import train

    from .nan_losses import NanAfterTwo

    NanAfterTwo.calls = 0
    recipe = tiny_recipe("loss.distill=test_nan_after_2", "schedule.max_steps=4", "checkpoint.every=1",
                         "checkpoint.keep_last=1", "optim.max_nonfinite=5")  # fmt: skip
    train(recipe)
    assert [p.name for p in checkpoint_dirs(recipe.run_dir / "checkpoints")] == ["step_00000002", "step_00000004"]


def test_weights_holding_nan_and_a_trainer_state_of_other_types_are_refused_by_name(tiny_recipe):
    """Bytes overwritten in model.safetensors (read as NaN) were resumed: every step was skipped as non-finite
    and the run "finished" with NaN metrics; checkpoint.init_from blamed the learning rate. A trainer_state.json
    with {"step": "x"} was a TypeError traceback."""
    import json

    from safetensors.torch import load_file, save_file

    from sak.engine import train
    from sak.engine.checkpoint import CheckpointError

    stopped = tiny_recipe("schedule.max_steps=4", "run.stop_at=2")
    train(stopped)
    step = stopped.run_dir / "checkpoints" / "step_00000002"
    (step / "checksums.json").unlink()  # as a checkpoint written before 2026-11-29 (else its sha256 tells first)
    good = load_file(str(step / "model.safetensors"))
    name = next(k for k, v in good.items() if v.is_floating_point())
    save_file({**good, name: torch.full_like(good[name], float("nan"))}, str(step / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"cannot resume from {step}: a file of it is damaged .*NaN or inf "
                       rf"weights \(.*{name.split('.')[-1]}\)"):  # fmt: skip
        train(tiny_recipe("schedule.max_steps=4"))
    with pytest.raises(ValueError, match=rf"checkpoint.init_from '{step}.*' holds NaN or inf weights \({name}\)"):
        train(tiny_recipe("run.name=other", f"checkpoint.init_from={step}"))
    save_file(good, str(step / "model.safetensors"))
    (step / "trainer_state.json").write_text(json.dumps({"step": "x"}))
    with pytest.raises(CheckpointError, match=r"trainer_state.json holds values of other types than a trainer state"):
        train(tiny_recipe("schedule.max_steps=4"))


def test_bytes_changed_in_a_checkpoint_are_named_by_its_sha256_wherever_it_is_read(tiny_recipe, tmp_path):
    """One byte flipped inside a tensor (no NaN, the same size) or inside optimizer.bin loaded silently: every
    file a checkpoint holds has its sha256 in checksums.json, checked on resume, checkpoint.init_from, export and
    the feature pictures (sak viz features)."""
    import json

    from sak.engine import train
    from sak.engine.checkpoint import CheckpointError
    from sak.engine.export import ExportError, export_student
    from sak.engine.viz import load_student_for_features

    stopped = tiny_recipe("schedule.max_steps=4", "run.stop_at=2")
    train(stopped)
    step = stopped.run_dir / "checkpoints" / "step_00000002"
    listed = json.loads((step / "checksums.json").read_text())["sha256"]
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "recipe.yaml"} <= set(listed)
    assert "trainer_state.json" not in listed  # written after it, as the mark of a complete checkpoint

    def flip(name: str) -> bytes:
        data = (step / name).read_bytes()
        (step / name).write_bytes(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
        return data

    good = flip("optimizer.bin")
    with pytest.raises(CheckpointError, match=rf"cannot resume from {step}: a file of it is damaged or unreadable "
                       r"\(ValueError: optimizer.bin changed since it was saved \(sha256 "):  # fmt: skip
        train(tiny_recipe("schedule.max_steps=4"))
    (step / "optimizer.bin").write_bytes(good)
    good = flip("model.safetensors")
    changed = r"model.safetensors' *: damaged: model.safetensors changed since it was saved \(sha256 [0-9a-f]{12}\.\.\."
    with pytest.raises(ValueError, match=rf"checkpoint.init_from '{step}/{changed}"):
        train(tiny_recipe("run.name=other", f"checkpoint.init_from={step}"))
    with pytest.raises(ExportError, match=rf"sak export --from '{step}/{changed}"):
        export_student(stopped, step, tmp_path / "export")
    with pytest.raises(ValueError, match=rf"--checkpoint '{step}/{changed}"):
        load_student_for_features(stopped, step, {}, [])
    (step / "model.safetensors").write_bytes(good)
    train(tiny_recipe("schedule.max_steps=4"))  # as saved again: it resumes


def test_init_from_a_run_takes_weights_and_statistics_of_one_checkpoint(tiny_recipe, monkeypatch):
    """The run directory's latest checkpoint was looked up once for the weights and again for the target
    statistics (and by each process on its own): a checkpoint saved between the two gave statistics of another
    step. Here the newer one's statistics are damaged, so that taking them fails loudly."""
    import shutil

    import sak.engine.init as init_module
    from sak.engine import train
    from sak.engine.checkpoint import latest_checkpoint

    source = tiny_recipe("schedule.max_steps=2", "loss.normalize=standardize")
    train(source)
    load_weights = init_module.init_student_from

    def then_a_checkpoint_is_saved(student, path):
        missing = load_weights(student, path)
        newer = latest_checkpoint(source.run_dir / "checkpoints").with_name("step_99999999")
        shutil.copytree(latest_checkpoint(source.run_dir / "checkpoints"), newer)
        (newer / "target_normalizers.safetensors").write_bytes(b"damaged")
        return missing

    monkeypatch.setattr(init_module, "init_student_from", then_a_checkpoint_is_saved)
    train(tiny_recipe("run.name=next", "schedule.max_steps=1", "loss.normalize=standardize",
                      f"checkpoint.init_from={source.run_dir}"))  # fmt: skip
    assert latest_checkpoint(source.run_dir / "checkpoints").name == "step_99999999"  # (saved in between)
