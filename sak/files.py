"""Writing files whole and with the permissions any other file of the run gets, and reading only regular files
(no heavy imports)."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status), else set and put
    back at once (os.umask has no read-only form)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_umask_allows(*paths: str | os.PathLike) -> None:
    """Give files the mode a newly created file gets (0o666 less the umask). safetensors 0.8 writes through a
    temporary file created 0600 whatever the umask (safetensors/safetensors#782, open): checkpoints, exports
    and cache shards were unreadable to the user's group, beside a recipe.yaml that was not."""
    mode = 0o666 & ~umask()
    for path in paths:
        try:
            os.chmod(path, mode)
        except OSError:  # a file system without modes (some FUSE / SMB mounts): the file is written all the same
            pass


@contextmanager
def writing(path: str | os.PathLike):
    """An OSError raised inside (a full disk, a read-only file system) names `path`, the file being written: the
    bare `[Errno 28] No space left on device` left the user to guess which of a run's files it was."""
    try:
        yield
    except OSError as exc:
        if str(path) in str(exc) or "cannot write " in str(exc):  # (named already: a temporary file beside it)
            raise
        message = f"cannot write {path}: {exc.strerror or exc}"
        raise (OSError(message) if exc.errno is None else OSError(exc.errno, message)) from exc


def discard(path: Path) -> None:
    """Delete a temporary file if it is there; a failure to (a read-only file system) must not replace the error
    that the write it was cleaning up after raised, which names the file."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, then `as_umask_allows`. Its I/O failures (a full disk) are OSErrors naming
    `path`: safetensors raises a SafetensorError of its own, which the commands printed with a traceback."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        if "I/O error" not in str(exc):
            raise
        number = re.search(r"\(os error (\d+)\)", str(exc))
        code = int(number.group(1)) if number else errno.EIO
        raise OSError(code, os.strerror(code), str(path)) from exc
    as_umask_allows(path)


def write_whole(path: str | os.PathLike, write: Callable[[Path], object], sync: bool = True) -> Path:
    """`write(tmp)` writes a temporary file beside `path`, which is then renamed over it: a full disk or a kill
    mid-write leaves the previous file as it was, not cut off. `sync`: the file's bytes on disk before the rename
    (left out for many small pictures, `sak viz`). An OSError names `path`."""
    path = Path(path)
    # the process id in the temporary name: two processes writing one file (`sak predict` under a launch) do not
    # rename each other's
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            if sync:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        discard(tmp)
    return path


def write_text_whole(path: str | os.PathLike, text: str) -> None:
    """`text` into `path` as UTF-8, written whole (`write_whole`)."""
    write_whole(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def refuse_special_file(path: str | os.PathLike) -> None:
    """An OSError naming `path` if it is a named pipe, socket or device: opening one to read waits for a writer
    (a FIFO named x.jpg in an image folder hung training in Image.open). A missing file: FileNotFoundError."""
    mode = os.stat(path).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise OSError(errno.EINVAL, f"{os.fspath(path)} is a named pipe, socket or device, not a file to read")


# the task folders of saved predictions, in this order (sak.engine.predictions.SUFFIX is made from them)
TASKS = ("semseg", "parts", "saliency", "edges", "normals", "depth")


def check_not_input(out: str | os.PathLike, inputs=(), folders=(), task_folders=(), flag: str = "--out") -> None:
    """A ValueError if writing `out` would replace an input: one of the `inputs` (files, or a folder to be
    written), an existing file under one of the `folders` (data.root, a folder pool, a checkpoint), or anything
    in a task folder of one of the `task_folders` (predictions: `<folder>/<task>/`). None entries are skipped; a
    new file beside the inputs (`--out results.json` next to the predictions) is fine."""
    path = Path(out).resolve()
    clash = [f for f in inputs if f and path == Path(f).resolve()]
    ours = path.is_file() and is_sak_output(path)  # (a result or manifest an earlier run wrote there: a rerun)
    clash += [d for d in folders if d and path.is_file() and not ours and path.is_relative_to(Path(d).resolve())]
    clash += [d for d in task_folders if d and any(path.is_relative_to(Path(d).resolve() / t) for t in TASKS)]
    if clash:
        raise ValueError(f"{flag} {out} is (or is in) {clash[0]}, an input of this command: give another file")


def is_sak_output(path: Path) -> bool:
    """Whether `path` holds what a sak command writes as its output: an evaluation's result JSON (`sak eval` /
    `eval-preds`) or a selection manifest (`sak select`, whose first line names it)."""
    try:
        if path.stat().st_size > 1 << 24:
            return False
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if text.startswith("# sak select "):
        return True
    try:
        data = json.loads(text)
    except ValueError:
        return False
    return isinstance(data, dict) and "tasks" in data and ("checkpoint" in data or "predictions" in data)


def refuse_dangling_link(path: str | os.PathLike, flag: str) -> None:
    """A FileNotFoundError naming a symbolic link to nothing at `path` or on its way (a link to a disk not mounted,
    a folder deleted): making the folder there failed with a bare `FileExistsError: [Errno 17] File exists`."""
    link = next((p for p in (Path(path), *Path(path).parents) if p.is_symlink() and not p.exists()), None)
    if link is not None:
        target = os.readlink(link)  # (a chain of links: the path missing at its end named too)
        through = f" and on to {os.path.realpath(link)}" if os.path.islink(link.parent / target) else ""
        raise FileNotFoundError(f"{flag} {path}: {link} is a symbolic link to {target}{through}, which does not "
                                "exist; create it (mount its disk) or give another path")  # fmt: skip


def check_out(out: str | None, inputs=(), folders=(), task_folders=()) -> None:
    """`--out FILE` checked before the scoring: a folder there, or a folder that cannot be made or written, would
    otherwise be found when the result is written, at the end of a long evaluation; and an input of the command
    it would replace (`check_not_input`)."""
    if out is None:
        return
    path = Path(out)
    refuse_dangling_link(path, "--out")
    check_not_input(out, inputs, folders, task_folders)
    if path.is_dir():
        raise ValueError(f"--out {out}: a folder; give the result JSON's file name (e.g. {path / 'result.json'})")
    parent = next(p for p in path.absolute().parents if p.exists())  # (the root exists)
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, so no folder can be made there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: no permission to write into {parent}")


def check_preds_folder(folder: str | os.PathLike, flag: str, data_root: str | None = None) -> None:
    """A folder to write predictions into (a subfolder per task), checked before the model runs: not a file, nor
    holding a file where a task's subfolder goes, not the dataset's own folder (NYUD-v2's depth/ and normals/
    have the predictions' layout: its ground truth was replaced by the predictions), nor one whose task folder
    would be the dataset."""
    refuse_dangling_link(folder, flag)
    path = Path(folder).resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {folder}: a file; give a folder for the predictions (a subfolder per task)")
    taken = [t for t in TASKS if (path / t).exists() and not (path / t).is_dir()]
    if taken:  # (else a FileExistsError after some images were written, one of them without that task)
        raise ValueError(f"{flag} {folder}: holds a file {taken[0]!r} where the {taken[0]} predictions' folder goes; "
                         "give another folder")  # fmt: skip
    root = Path(data_root).resolve() if data_root else None
    # the dataset's own folder (NYUD-v2's depth/ and normals/ are there), or the dataset where a task's
    # predictions go; a folder in it, or above it otherwise, replaces none of its files
    if root is not None and (path == root or any(root.is_relative_to(path / t) for t in TASKS)):
        raise ValueError(f"{flag} {folder} overlaps data.root {data_root}: predictions written there could replace "
                         "the dataset's own files (NYUD-v2's depth/ and normals/ are laid out as predictions are); "
                         "give a folder outside it")  # fmt: skip
