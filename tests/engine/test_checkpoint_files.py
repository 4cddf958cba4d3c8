"""Saving checkpoints when the run directory holds leftovers that cannot be deleted (a file another program holds
open on NFS, a busy mount): the save goes on, the last good checkpoint stays, and the next start cleans up."""

import shutil

import pytest
import torch
from accelerate import Accelerator

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


def test_a_kill_while_a_start_writes_the_runs_recipe_leaves_the_one_before_whole(tiny_recipe, monkeypatch):
    """recipe.yaml and run_info.json beside the run were written in place: a kill (here, an error half-way through
    the write) left half a file, which `benchmarks.nyud` / `pascal_context` read as the run's recipe."""
    from pathlib import Path

    from sak.engine import run_records

    recipe = tiny_recipe()
    recipe.run_dir.mkdir(parents=True)
    (recipe.run_dir / "recipe.yaml").write_text("the recipe of the start before\n")
    write_text = Path.write_text

    def killed(self, text, *args, **kwargs):
        if self.name.startswith("recipe.yaml"):
            write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", killed)
    extra = {"recipe.yaml": recipe.to_yaml(), "run_info.json": "{}"}
    with pytest.raises(KeyboardInterrupt):
        run_records.record_start(recipe, None, 0, extra, None)
    assert (recipe.run_dir / "recipe.yaml").read_text() == "the recipe of the start before\n"
