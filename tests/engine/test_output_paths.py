"""What a killed export leaves beside its --out (cleaned by the next export into it), and output paths through a link
to nothing."""

import socket
import subprocess
import sys

from sak.cli import main
from sak.engine import train

from ..conftest import TESTS


def test_an_export_removes_the_folders_that_killed_exports_into_it_left(tiny_recipe, tmp_path, capsys):
    """An export writes its files into a folder beside --out and renames them into it; a kill -9 (no clean-up)
    left that folder, a student's weights, forever: now named after its process and host, and deleted by the next
    export into the same --out once that process is gone. A live process's, another host's and another export's
    stay."""
    train(tiny_recipe("schedule.max_steps=1"))
    out = tmp_path / "export"
    host = socket.gethostname()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / f".export.{int(gone.stdout)}@{host}.partial"  # (the process has ended)
    kept = [tmp_path / f".export.1@{host}.partial",  # a live process (init)
            tmp_path / f".export.{int(gone.stdout)}@not-{host}.partial",  # another host's: cannot be told
            tmp_path / f".export.v2.{int(gone.stdout)}@{host}.partial"]  # another export's (export.v2)  # fmt: skip
    for folder in (killed, *kept):
        folder.mkdir()
        (folder / "student.safetensors").write_bytes(b"half a student")
    assert main(["export", str(TESTS / "tiny.yaml"), f"run.output_dir={tmp_path}", "--out", str(out)]) == 0
    assert not killed.exists() and all(folder.exists() for folder in kept)
    assert sorted(p.name for p in out.iterdir()) == ["student.safetensors", "student.yaml"]
    assert sorted(p.name for p in tmp_path.glob(".export*")) == sorted(p.name for p in kept)  # (its own removed)


def test_an_output_path_through_a_link_to_nothing_is_named(tiny_recipe, tmp_path, capsys):
    """A symbolic link to a missing folder (a disk not mounted) as --out or the run directory: making the folder
    failed with a bare `FileExistsError: [Errno 17] File exists`."""
    import pytest

    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "unmounted")
    with pytest.raises(FileNotFoundError, match=f"{dangling} is a symbolic link to {tmp_path / 'unmounted'}, which"):
        train(tiny_recipe(f"run.output_dir={dangling}", "schedule.max_steps=1"))
    train(tiny_recipe("schedule.max_steps=1"))
    capsys.readouterr()
    for out in (dangling, dangling / "export"):
        assert main(["export", str(TESTS / "tiny.yaml"), f"run.output_dir={tmp_path}", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: {dangling} is a symbolic link to {tmp_path / 'unmounted'}, which does not exist" in err
    assert main(["predict", str(tmp_path), str(tmp_path / "x.png"), "--out", str(dangling)]) == 2
    assert f"--out {dangling}: {dangling} is a symbolic link" in capsys.readouterr().err
