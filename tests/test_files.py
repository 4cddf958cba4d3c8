"""Files sak writes get the permissions the umask allows: safetensors 0.8 creates its files 0600."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sak.files import save_safetensors, umask, write_text_whole


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


def limited(code: str, tmp_path) -> subprocess.CompletedProcess:
    """`code` run in a Python whose files may not grow past 64 KiB (RLIMIT_FSIZE, SIGXFSZ ignored): a write past
    it fails with EFBIG, as one on a full disk fails with ENOSPC."""
    prelude = (
        "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
    )
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=tmp_path, capture_output=True, text=True)


def test_a_write_that_fails_names_its_file_and_leaves_no_partial_one(tmp_path):
    """safetensors' own SafetensorError (a traceback from `sak cache build` and `sak export` on a full disk) and
    the bare OSErrors of prediction files named no file."""
    run = limited(
        "import torch, numpy as np\n"
        "from pathlib import Path\n"
        "from sak.files import save_safetensors\n"
        "from sak.engine.cache.store import _atomic_save\n"
        "from sak.engine.predictions import save_encoded\n"
        "for write in (lambda: save_safetensors({'w': torch.zeros(1 << 16)}, 'big.safetensors'),\n"
        "              lambda: _atomic_save({'w': torch.zeros(1 << 16)}, Path('shard00000.safetensors')),\n"
        "              lambda: save_encoded('preds', 'depth', 'img0', np.zeros((256, 256), np.float32))):\n"
        "    try:\n"
        "        write()\n"
        "    except OSError as exc:\n"
        "        print(type(exc).__name__, exc)\n",
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    first, shard, second = run.stdout.splitlines()
    assert first == "OSError [Errno 27] File too large: 'big.safetensors'"
    assert shard == "OSError [Errno 27] cannot write shard00000.safetensors: File too large"  # (not its .partial)
    # (numpy's own words for the short write: "65536 requested and 16352 written")
    assert second.startswith(f"OSError cannot write {Path('preds') / 'depth' / 'img0.npy'}: ")
    assert sorted(p.name for p in (tmp_path / "preds" / "depth").iterdir()) == []


def test_a_failed_write_whole_names_its_file_though_its_clean_up_fails_too(tmp_path):
    """The temporary file's removal raised the same error again (a read-only file system; here a name too long),
    which replaced the one naming the file."""
    path = tmp_path / ("x" * 250)
    with pytest.raises(OSError, match=rf"cannot write {path}: File name too long"):
        write_text_whole(path, "text")
