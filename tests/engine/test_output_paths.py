"""What a killed export leaves beside its --out (cleaned by the next export into it), and output paths through a link
to nothing."""

import os
import socket
import subprocess
import sys

from sak.cli import main
from sak.engine import train

from ..conftest import TESTS


def test_an_export_removes_the_folders_that_killed_exports_into_it_left(tiny_recipe, tmp_path, capsys, monkeypatch):
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
    mine = tmp_path / f".export.{os.getpid()}@{host}.partial"  # a killed one's that had this pid (a container's)
    for folder in (killed, mine, *kept):
        folder.mkdir()
        (folder / "student.safetensors").write_bytes(b"half a student")
    assert main(["export", str(TESTS / "tiny.yaml"), f"run.output_dir={tmp_path}", "--out", str(out)]) == 0
    assert not killed.exists() and not mine.exists() and all(folder.exists() for folder in kept)
    assert sorted(p.name for p in out.iterdir()) == ["student.safetensors", "student.yaml"]
    assert sorted(p.name for p in tmp_path.glob(".export*")) == sorted(p.name for p in kept)  # (its own removed)
    # into the current folder (`--out .`, which has no name to write beside)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert main(["export", str(TESTS / "tiny.yaml"), f"run.output_dir={tmp_path}", "--out", "."]) == 0
    assert sorted(p.name for p in (tmp_path / "here").iterdir()) == ["student.safetensors", "student.yaml"]


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
    chained = tmp_path / "chained"  # a link to that link: the missing end named too (only the first link before)
    chained.symlink_to(dangling)
    with pytest.raises(FileNotFoundError, match=f"{chained} is a symbolic link to {dangling} and on to "
                                                f"{os.path.realpath(dangling)}, which does not exist"):  # fmt: skip
        train(tiny_recipe(f"run.output_dir={chained}", "schedule.max_steps=1"))


def test_an_image_whose_files_cannot_all_be_written_keeps_none(tmp_path, monkeypatch):
    """A full disk between an image's task files left it with some of them (semseg, not depth), which a later
    `eval-preds` reads as that image's predictions of those tasks."""
    from types import SimpleNamespace

    import numpy as np
    import pytest
    import torch
    from PIL import Image

    import sak.engine.export as export

    class Constant(torch.nn.Module):
        def forward(self, images, with_features=False):
            b, _, h, w = images.shape
            return SimpleNamespace(tasks={"semseg": torch.zeros(b, 3, h, w), "depth": torch.ones(b, 1, h, w)})

    photos = [tmp_path / f"photo{i}.png" for i in range(2)]
    for photo in photos:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
    save, calls = export.save_encoded, []

    def disk_full_at_the_fourth(*args):
        calls.append(args)
        if len(calls) == 4:  # photo1's depth, after its semseg
            raise OSError(28, f"cannot write {args[0]}/{args[1]}/{args[2]}.npy: No space left on device")
        return save(*args)

    config = {"tasks": [{"name": "semseg", "channels": 3}, {"name": "depth", "channels": 1}], "canvas": [16, 16],
              "image_fill": [0, 0, 0], "image_size": 16}  # fmt: skip
    out = tmp_path / "p"
    export.predict_images(Constant(), config, photos, out)  # predicted before: photo1's earlier files go too
    monkeypatch.setattr(export, "save_encoded", disk_full_at_the_fourth)
    with pytest.raises(OSError, match=rf"^\[Errno 28\] cannot write {out}/depth/photo1.npy: No space left on "
                       rf"device; none of {photos[1]}'s files was kept; the 1 image\(s\) before it were predicted "
                       rf"into {out}/$"):  # fmt: skip
        export.predict_images(Constant(), config, photos, out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "depth/photo0.npy",
        "semseg/photo0.png",
    ]
