"""Files sak writes get the permissions the umask allows: safetensors 0.8 creates its files 0600."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from sak.files import save_safetensors, umask


@pytest.fixture
def mask():
    """A umask of 027 for the test (group may read, others nothing), the caller's put back after."""
    before = os.umask(0o027)
    yield 0o027
    os.umask(before)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_umask_is_read_without_being_changed(mask):
    assert umask() == mask and umask() == mask


def test_a_safetensors_file_gets_the_mode_of_any_other_new_file(mask, tmp_path):
    save_safetensors({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
    (tmp_path / "x.txt").write_text("x")
    assert mode(tmp_path / "x.safetensors") == mode(tmp_path / "x.txt") == 0o640


def test_checkpoints_exports_and_cache_shards_are_readable_as_the_umask_allows(mask, tiny_recipe, tmp_path):
    """They were 0600 beside a 0640 recipe.yaml: a group sharing runs could read the recipe, not the weights."""
    from sak.engine import train
    from sak.engine.cache import build_cache
    from sak.engine.export import export_student

    recipe = tiny_recipe("schedule.max_steps=1", "data.options.length=4", "loss.normalize=standardize")
    train(recipe)
    export_student(recipe, recipe.run_dir, tmp_path / "export")
    cache = build_cache(recipe, tmp_path / "cache", shard_size=2)
    files = [*recipe.run_dir.rglob("*.safetensors"), *(tmp_path / "export").glob("*"), *cache.rglob("*.safetensors")]
    names = {f.name for f in files}
    assert {"model.safetensors", "target_normalizers.safetensors", "student.safetensors"} <= names, names
    assert {str(f): mode(f) for f in files} == {str(f): 0o640 for f in files}


def test_a_failed_write_leaves_the_previous_file_whole_and_names_it(tmp_path, monkeypatch):
    """`sak eval --out` / `eval-preds --out` wrote in place: a full disk left a cut-off JSON over a good one."""
    from sak.files import write_text_whole

    out = tmp_path / "r.json"
    write_text_whole(out, '{"good": 1}\n')

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=rf"cannot write {out}: No space left on device"):
        write_text_whole(out, '{"new": 2}\n')
    assert out.read_text() == '{"good": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["r.json"]
