"""Checkpoints that a crash cannot corrupt.

A checkpoint is a directory `checkpoints/step_00000042/` holding Accelerate's state (model weights
as safetensors, optimiser, scheduler, every process's RNG states) plus `trainer_state.json` (step,
epoch, data position), the resolved recipe and the run info. It is written under a `.partial`
name and renamed only when complete, so a kill at any moment leaves the last good checkpoint as it
was; older ones are pruned only after the new one exists. A step saved again (a periodic save followed by
the stop or final one) replaces its directory by two renames, the old one set aside until the new one is in
place, so that a kill between them still leaves one complete copy (restored by `clean_partials`).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..files import as_umask_allows, save_safetensors, write_text_whole
from ..teachers.weights import first_misfit

PREFIX = "step_"
PARTIAL = ".partial"
REPLACED = ".replaced"  # a checkpoint being replaced by a new save of the same step
PRUNED = ".pruned"  # a checkpoint being deleted by pruning
STATE_FILE = "trainer_state.json"
CHECKSUMS = "checksums.json"  # sha256 of every file Accelerate and the trainer wrote, before STATE_FILE
FINAL_METRICS = "final_metrics.json"  # a finished run's metrics, in its last checkpoint and its run directory


@dataclass
class TrainState:
    """Where training is: optimiser steps done, current epoch, batches of that epoch consumed."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    nonfinite_streak: int = 0
    # the training split the place in the epoch is counted in: its sample count and the sha256 of its ordered ids
    # (None: a checkpoint of sak before 2026-11-29, or a plug-in dataset without an `ids` list)
    samples: int | None = None
    samples_sha256: str | None = None


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted((p for p in found if (p / STATE_FILE).is_file()), key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (none with 0). Each is renamed out of the checkpoints'
    names first: a kill in the middle of deleting one leaves a folder that no resume takes for a complete
    checkpoint (its trainer_state.json may outlive files deleted before it); the next start removes it
    (`clean_partials`)."""
    for old in checkpoint_dirs(root)[:-keep_last] if keep_last > 0 else []:
        doomed = root / f"{old.name}{PRUNED}"
        try:
            _clear(doomed)
            os.replace(old, doomed)
        except OSError as exc:  # a full run is worth more than one checkpoint too many: keep it, try at the next save
            warnings.warn(f"could not prune the checkpoint {old} ({exc}); it is kept", RuntimeWarning, stacklevel=2)
            continue
        shutil.rmtree(doomed, ignore_errors=True)


def _clear(path: Path) -> None:
    """Make `path` free for a rename: delete what is there; what cannot be deleted (a file another program
    holds open on NFS, say) is moved to a free `.N.pruned` name, for `clean_partials` to try again."""
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        stem, n = path.name.split(".")[0], 1
        while (free := path.parent / f"{stem}.{n}{PRUNED}").exists():
            n += 1
        os.replace(path, free)


def save_checkpoint(
    accelerator,
    root: Path,
    state: TrainState,
    extra_files: dict[str, str],
    keep_last: int,
    extra_tensors: dict[str, dict] | None = None,
) -> Path:
    """Write a checkpoint for `state.step` atomically; every process must call this. `extra_tensors`
    maps a file stem to a state dict saved as safetensors (e.g. the target normalisers)."""
    final = root / f"{PREFIX}{state.step:08d}"
    partial = root / f"{final.name}{PARTIAL}"

    def begin() -> None:  # (a checkpoints/ that cannot be written into fails here, named as a failed save)
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)

    def finish() -> None:  # the main process's files, beside Accelerate's
        if not accelerator.is_main_process:
            return
        as_umask_allows(*partial.glob("*.safetensors"))  # Accelerate's model.safetensors: 0600 from safetensors 0.8
        for name, text in extra_files.items():
            (partial / name).write_text(text)
        for stem, tensors in (extra_tensors or {}).items():
            tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            save_safetensors(tensors, partial / f"{stem}.safetensors")
        write_checksums(partial)
        (partial / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))  # written last: marks completeness
        _fsync_tree(partial)

    # each part's failure raised in every process (the gather is the barrier): none waits for a save that will not
    # come. A full disk: torch's writer says "unexpected pos", safetensors its own
    for part in (begin, lambda: accelerator.save_state(str(partial), safe_serialization=True), finish):
        try:
            on_every_process(accelerator, part, "could not write its part")
        except torch.OutOfMemoryError:
            raise  # not the disk's doing
        except (OSError, RuntimeError, SafetensorError, CheckpointError) as exc:
            raise _not_written(accelerator, root, partial, exc) from exc

    def place() -> None:
        if accelerator.is_main_process:
            _put_in_place(partial, final)
            _fsync_dir(root)  # the rename on disk before pruning deletes older ones (a power loss keeps one of them)
            _prune(root, keep_last)

    on_every_process(accelerator, place, "could not put the checkpoint in place")  # (its error raised in all)
    return final


def write_checksums(folder: Path) -> None:
    """Record the sha256 of every file in `folder` (a checkpoint being written, every process's files in it) in
    CHECKSUMS. safetensors and pickle files carry no checksum of their own: bytes changed on disk or in a copy
    loaded silently (only NaN weights were caught)."""
    from ..digest import hash_threads, local_processes, sha256_files

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (STATE_FILE, CHECKSUMS))
    names = [p.relative_to(folder).as_posix() for p in files]
    digests = sha256_files(files, hash_threads(local_processes()))
    (folder / CHECKSUMS).write_text(json.dumps({"sha256": dict(zip(names, digests, strict=True))}, indent=2))


def changed_file(folder: Path, names: list[str] | None = None, rank: int | None = None) -> str | None:
    """What is wrong with the files `names` of checkpoint `folder` (None: every file its CHECKSUMS lists, of the
    processes' random states only process `rank`'s, the one it reads) against the sha256 written with them, or
    None when they are as saved. A checkpoint without CHECKSUMS (written before 2026-11-29) is taken as it is; a
    file it does not list (final_metrics.json, added later) is not checked."""
    from ..digest import hash_threads, local_processes, sha256_files

    record = folder / CHECKSUMS
    if not record.is_file():
        return None
    try:
        listed = json.loads(record.read_text())["sha256"]
        if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
            raise TypeError("expected {file name: sha256}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{CHECKSUMS} is unreadable ({type(exc).__name__}: {exc})"
    if names is None:
        own = f"random_states_{rank}.pkl"
        names = [n for n in listed if rank is None or not n.startswith("random_states_") or n == own]
    names = [n for n in names if n in listed]
    gone = [n for n in names if not (folder / n).is_file()]
    if gone:
        return f"{gone[0]} is gone"
    for name, got in zip(
        names, sha256_files([folder / n for n in names], hash_threads(local_processes())), strict=True
    ):
        if got != listed[name]:
            return f"{name} changed since it was saved (sha256 {got[:12]}..., {CHECKSUMS} says {listed[name][:12]}...)"
    return None


def refuse_changed(file: Path, what: str, error: type[ValueError] = ValueError) -> None:
    """Raise `error` naming `file` (`what`: the setting or flag that gave it) when it is one of a checkpoint's
    files and its bytes changed since it was saved (`changed_file`)."""
    problem = changed_file(file.parent, [file.name])
    if problem is not None:
        raise error(f"{what} {str(file)!r}: damaged: {problem}; use another checkpoint of that run")


def read_weights(file: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's safetensors `file`, checked against the checkpoint's CHECKSUMS first (when it
    is one of its files); `what` names the setting or flag that gave it. A changed file is a ValueError."""
    from safetensors.torch import load_file

    refuse_changed(file, what)
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own types for a file of another format or a damaged one
        raise ValueError(f"{what} {str(file)!r}: not a readable safetensors file ({exc})") from exc


def _not_written(accelerator, root: Path, partial: Path, exc: Exception) -> OSError:
    """A checkpoint that could not be written (a full disk): its partial folder removed, which frees the space
    it took, and the error naming it and the last complete checkpoint, which is as it was."""
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    last = latest_checkpoint(root)
    what = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    kept = f"the last complete one, {last}, is as it was" if last is not None else "there is no earlier checkpoint"
    disk = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
        w in str(exc) for w in ("No space", "unexpected pos", "StorageFull", "quota", "QuotaExceeded"))  # fmt: skip
    message = (f"cannot write checkpoint {partial.name} in {root} ({type(exc).__name__}: {what}"
               f"{'; a full disk or quota' if disk else ''}); {kept}" + (": free space and run again to resume" if disk else ""))  # fmt: skip
    code = getattr(exc, "errno", None)
    return OSError(code, message) if code else OSError(message)  # (not "[Errno 0]" for torch's RuntimeError)


def first_nonfinite(tensors) -> str | None:
    """The name of the first floating tensor of (name, tensor) pairs holding NaN or inf, or None."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def add_to_checkpoint(accelerator, checkpoint: Path, name: str, text: str) -> None:
    """Put the file `name` holding `text` into a saved checkpoint, renamed in when written whole (the final
    metrics, which come after the final checkpoint is saved); every process must call this."""
    if accelerator.is_main_process:
        write_text_whole(checkpoint / name, text)
        _fsync_dir(checkpoint)  # (the rename on disk: a start after a power loss finds the metrics)
    accelerator.wait_for_everyone()


def _put_in_place(partial: Path, final: Path) -> None:
    if not final.exists():
        os.replace(partial, final)
        return
    # the same step saved again: set the old copy aside until the new one is in place
    aside = final.with_name(f"{final.name}{REPLACED}")
    try:
        _clear(aside)
        os.replace(final, aside)
    except OSError as exc:  # the earlier save of this step stays: the same weights and data position
        warnings.warn(f"could not replace {final} ({exc}); its earlier save is kept", RuntimeWarning, stacklevel=3)
        shutil.rmtree(partial, ignore_errors=True)
        return
    os.replace(partial, final)
    shutil.rmtree(aside, ignore_errors=True)  # a leftover is removed by the next start (`clean_partials`)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: damaged, or another student's."""


def on_every_process(accelerator, action, failed: str = "refused the resume"):
    """`action()` on every process, an error in any of them raised in all: a resume refused by one process (its
    own random-state file damaged) let the main process go on to set checkpoints aside and rewrite the run's
    records before it died at the next barrier. Another process's error comes as a CheckpointError naming it."""
    try:
        result, error = action(), None
    except Exception as exc:  # (raised below, in every process)
        result, error = None, exc
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        said = gather_object([None if error is None else f"{type(error).__name__}: {error}"])
        found = [(rank, text) for rank, text in enumerate(said) if text is not None]
        if found and error is None:
            raise CheckpointError(f"process {found[0][0]} {failed}: {found[0][1]}")
    if error is not None:
        raise error
    return result


def load_checkpoint(accelerator, path: Path, changes: list[str] | None = None) -> TrainState:
    """Restore model, optimiser, scheduler and RNG states from `path`; returns the trainer state. `changes`:
    how the recipe differs from the checkpoint's, named if its weights do not fit this recipe's student."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        inside = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path) if path.is_dir() else None
        hint = f"; it holds checkpoints: give one, e.g. checkpoint.resume={inside}" if inside is not None else ""
        raise FileNotFoundError(f"{path} is not a complete sak checkpoint (no {STATE_FILE}){hint}")
    # before Accelerate reads them (a changed optimizer.bin loaded without a word): the files this process reads
    problem = changed_file(path, rank=accelerator.process_index)
    if problem is not None:
        raise CheckpointError(damaged(path, ValueError(problem)))
    check_random_states(path, accelerator.process_index, accelerator.num_processes)
    try:
        accelerator.load_state(str(path))
    except torch.OutOfMemoryError:
        raise  # not the checkpoint's fault
    except RuntimeError as exc:
        if "loading state_dict" not in str(exc):
            raise CheckpointError(damaged(path, exc)) from exc
        differs = f"; the recipe differs from the one it was trained with: {'; '.join(changes)}" if changes else ""
        sized = [c.split(" -> ")[0].replace(": ", "=", 1).replace("=None", "=null") for c in changes or ()
                 if c.startswith("student.input_size:")]  # fmt: skip
        remedy = f"Resume with {sized[0]} (the checkpoint's), or start" if sized else "Start"
        raise CheckpointError(
            f"cannot resume from {path}: its weights do not fit this recipe's student ({first_misfit(exc)}){differs}. "
            f"{remedy} a new run instead (another run.name, or checkpoint.resume=never)"
        ) from exc
    except ValueError as exc:
        if "parameter group" not in str(exc):  # (torch.optim.Optimizer.load_state_dict's words for a misfit)
            raise CheckpointError(damaged(path, exc)) from exc
        differs = f"; the recipe differs from the one it was trained with: {'; '.join(changes)}" if changes else ""
        raise CheckpointError(
            f"cannot resume from {path}: its optimiser state does not fit this recipe's trainable parameters "
            f"({exc}){differs}. Start a new run from its weights instead (another run.name, and "
            f"checkpoint.init_from={path})"
        ) from exc
    except Exception as exc:  # safetensors' and pickle's own errors for a truncated or overwritten file
        raise CheckpointError(damaged(path, exc)) from exc
    # NaN weights (bytes overwritten on disk) would train on as non-finite steps and end in a "finished" run
    bad = first_nonfinite((n, t) for m in accelerator._models for n, t in (*m.named_parameters(), *m.named_buffers()))
    if bad is not None:
        raise CheckpointError(damaged(path, ValueError(f"model.safetensors holds NaN or inf weights ({bad})")))
    return read_train_state(path)


def finished_state(path: Path, total: int, processes: int) -> TrainState | None:
    """The state of a finished run's last checkpoint (its final metrics beside it, its step at or past `total`)
    that another number of processes wrote, read alone: nothing is left to train or evaluate, and the trainer
    returns its final metrics; `load_checkpoint` would refuse its random states (`check_random_states`). None
    for any other checkpoint."""
    if not (path / FINAL_METRICS).is_file() or not (path / STATE_FILE).is_file():
        return None
    if written_processes(path) == processes:
        return None
    state = read_train_state(path)
    return state if state.step >= total else None


def written_processes(path: Path) -> int:
    """How many processes wrote checkpoint `path`: Accelerate saves one random-state file for each, and its
    run_info.json records the world size. Files alone undercount a copy that lost one (or a node's local disk,
    which holds its own processes' files): a 2-process checkpoint without random_states_1.pkl was resumed by one
    process, repeating samples."""
    counted = len(list(path.glob("random_states_*.pkl")))
    try:
        recorded = json.loads((path / "run_info.json").read_text())["world_size"]
    except (OSError, ValueError, KeyError, TypeError):  # (written before run_info.json, or damaged: its checksum)
        return counted
    return max(counted, recorded) if type(recorded) is int else counted


def read_train_state(path: Path) -> TrainState:
    """The trainer state of checkpoint `path`; a damaged one is a CheckpointError."""
    state_file = path / STATE_FILE
    try:
        state = TrainState(**json.loads(state_file.read_text()))
        counts = [state.step, state.epoch, state.batch_in_epoch, state.nonfinite_streak]
        if state.samples is not None:
            counts.append(state.samples)
        if any(type(v) is not int for v in counts) or not isinstance(state.samples_sha256, (str, type(None))):
            raise TypeError(f"{STATE_FILE} holds values of other types than a trainer state's: {asdict(state)}")
        return state
    except (ValueError, TypeError) as exc:
        raise CheckpointError(damaged(path, exc)) from exc


# the optimiser's settings a recipe sets (AdamW's; "initial_lr" is the schedule's base learning rate, "fused"
# optim.fused's kernel)
OPTIMISER_SETTINGS = ("initial_lr", "weight_decay", "betas", "eps", "fused")


def optimiser_settings(optimizer) -> list[dict]:
    """Each parameter group's recipe settings (`OPTIMISER_SETTINGS`), taken before a checkpoint is loaded."""
    return [{k: group[k] for k in OPTIMISER_SETTINGS if k in group} for group in optimizer.param_groups]


def restore_optimiser_settings(optimizer, scheduler, settings: list[dict]) -> None:
    """Put the recipe's settings back after a checkpoint was loaded: the optimiser's state_dict brings back the
    settings of the run that saved it, and the scheduler's its base learning rates, so that a resume with
    another optim.lr, weight_decay, betas, eps or fused would go on with the old ones while recipe.yaml records
    the new. The moments and the schedule's position stay the checkpoint's; the learning rate is the schedule's at
    that position for the recipe's base rate."""
    lambda_lr = getattr(scheduler, "scheduler", scheduler)  # (Accelerate's wrapper holds the LambdaLR)
    for group, wanted in zip(optimizer.param_groups, settings, strict=True):
        group.update(wanted)
        if group.get("fused") or group.get("capturable"):  # their kernels keep the step count beside the weights,
            for param in group["params"]:  # where load_state_dict puts it only for a checkpoint saved so
                step = optimizer.state.get(param, {}).get("step")
                if isinstance(step, torch.Tensor):
                    optimizer.state[param]["step"] = step.to(device=param.device, dtype=torch.float32)
    lambda_lr.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, lambda_lr.base_lrs, lambda_lr.lr_lambdas, strict=True):
        group["lr"] = base * factor(lambda_lr.last_epoch)
    lambda_lr._last_lr = [group["lr"] for group in optimizer.param_groups]  # (what get_last_lr() reports)


def check_random_states(path: Path, rank: int, processes: int) -> None:
    """Refuse a checkpoint whose random states this process cannot restore, before Accelerate's `load_state`,
    which only logs that it could not load them and goes on (the resumed run then draws other router noise and
    drop paths than the uninterrupted one would). Accelerate writes one file per process: a checkpoint of
    another number of processes is refused too, since each process's position in the epoch would also differ."""
    from accelerate.utils import load

    written = written_processes(path)
    if written != processes:
        # (--multi_gpu: without it a CPU launch starts one process whatever --num_processes says)
        launch = "one process" if written == 1 else f"`accelerate launch --multi_gpu --num_processes {written}`"
        final = path / FINAL_METRICS
        raise CheckpointError(
            f"cannot resume from {path}: it was written by {written} process(es) and this run has {processes}; an "
            f"exact resume needs the same number ({launch}); or start a new run (another run.name) from its weights "
            f"with checkpoint.init_from={path}, without its optimiser state"
            + (f". It is a finished run's last checkpoint: its final metrics are in {final}" if final.is_file() else "")
        )
    try:
        states = load(path / f"random_states_{rank}.pkl")  # (weights_only, as Accelerate loads it)
        missing = {"random_state", "numpy_random_seed", "torch_manual_seed"} - set(states)
        if missing:
            raise KeyError(f"random_states_{rank}.pkl lacks {sorted(missing)}")
    except Exception as exc:
        raise CheckpointError(damaged(path, exc)) from exc


def damaged(path: Path, exc: Exception, name: str | None = None) -> str:
    """What to say of a checkpoint whose files cannot be read (`name`: the one, where known), with the earlier
    complete one to resume from."""
    what = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    found = checkpoint_dirs(path.parent)
    earlier = found[: found.index(path)] if path in found else []
    hint = (
        f"; resume from the one before with checkpoint.resume={earlier[-1]}, or set this one aside"
        if earlier
        else "; set it aside (or checkpoint.resume=never) to start again"
    )
    which = f"{name}: " if name else ""
    return (
        f"cannot resume from {path}: a file of it is damaged or unreadable ({which}{type(exc).__name__}: {what}){hint}"
    )


def clean_partials(root: Path) -> None:
    """Remove half-written (and half-deleted) checkpoints left by a killed run; put back a checkpoint that was set
    aside to be replaced if its replacement never arrived."""
    if root.is_dir():
        for p in [*root.glob(f"{PREFIX}*{PARTIAL}"), *root.glob(f"{PREFIX}*{PRUNED}")]:
            shutil.rmtree(p, ignore_errors=True)
        for p in root.glob(f"{PREFIX}*{REPLACED}"):
            final = p.with_name(p.name.removesuffix(REPLACED))
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, final)


def set_aside(root: Path, folder: str, after: int = -1) -> Path | None:
    """Move every checkpoint under `root` (of a step above `after`) into `root/folder`: a run started afresh in
    a directory that holds another run's checkpoints, or resumed from an earlier checkpoint than the latest,
    whose later ones pruning (it keeps the highest steps) and `resume: auto` would otherwise take for this
    run's. Returns the folder, or None when there was nothing to move."""
    found = [p for p in checkpoint_dirs(root) if int(p.name[len(PREFIX) :]) > after]
    if not found:
        return None
    target = root / folder
    for n in itertools.count(2):  # (two starts in one second: folder-2, not a FileExistsError)
        try:
            target.mkdir(parents=True)
            break
        except FileExistsError:
            target = root / f"{folder}-{n}"
    for p in found:
        os.replace(p, target / p.name)
    return target
