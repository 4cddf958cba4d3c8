"""The run directory's records of a run's starts (the trainer's bookkeeping, kept out of its loop): an earlier
run's files set aside, what changed in the recipe since a checkpoint, the ids each process trained on per step
(`logging.sample_ids`), recipe.yaml / run_info.json / starts.jsonl, and the final metrics' copy beside the run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from ..config import Recipe, TaskConfig, TeacherConfig
from ..files import refuse_dangling_link, write_text_whole, write_whole, writing
from .checkpoint import FINAL_METRICS, CheckpointError, clean_partials, damaged, set_aside
from .logging import flatten

# settings that may change between the starts of one run without changing what it computes
RESUME_KEYS = ("checkpoint.resume", "run.stop_at", "logging.", "eval.")


def _flat(d: dict) -> dict:
    return flatten(d, split_lists=True)


# the defaults a key takes when a recipe leaves it out, per section (list items by their type)
_ITEM_DEFAULTS = {"teachers": TeacherConfig, "tasks": TaskConfig}
_NO_DEFAULT = object()


def _defaults() -> Callable[[str], object]:
    """key -> the schema's default of a flat key (`teachers.1.adapter` -> TeacherConfig().adapter), or
    _NO_DEFAULT; the defaults are flattened once per call."""
    top = _flat(Recipe().to_dict())
    items = {head: _flat(dataclasses.asdict(cls())) for head, cls in _ITEM_DEFAULTS.items()}

    def default(key: str) -> object:
        head, _, rest = key.partition(".")
        index, _, field_key = rest.partition(".")
        if head in items and index.isdigit():
            return items[head].get(field_key, _NO_DEFAULT)
        return top.get(key, _NO_DEFAULT)

    return default


def changes_message(source: Path, changed: list[str], done: bool) -> str:
    """What a resume says of a recipe (or cache) other than its checkpoint's; `done`: a finished run started
    again, which trains nothing and keeps the recipe that trained it in recipe.yaml (`record_start`)."""
    kept = "still holds the recipe that trained it (this start trains nothing)" if done else "now holds this one"
    return (
        f"[sak] the recipe (its teachers, or the cache it reads) differs from the one {source} was trained with: "
        f"{'; '.join(changed)}. recipe.yaml {kept}; starts.jsonl has every start's recipe"
    )


TEACHERS_FILE = "teachers.json"
CACHE_FILE = "cache.json"


def changes_since(source: Path, recipe: Recipe, extra_files: dict[str, str]) -> list[str]:
    """What a resume from checkpoint `source` would change: the recipe's values (`recipe_changes`), the teachers'
    identities (`teacher_changes`) and the facts of the cache the run reads (cache.json), against the files the
    checkpoint holds; `extra_files` are this start's."""
    changed = recipe_changes(source / "recipe.yaml", recipe)
    changed += teacher_changes(source / TEACHERS_FILE, json.loads(extra_files[TEACHERS_FILE]))
    if CACHE_FILE in extra_files and (source / CACHE_FILE).is_file():
        before, now = json.loads((source / CACHE_FILE).read_text()), json.loads(extra_files[CACHE_FILE])
        changed += [f"cache {k}: {before.get(k)!r} -> {v!r}" for k, v in now.items() if before.get(k) != v]
    return changed


def teacher_changes(saved: Path, now: dict) -> list[str]:
    """`teacher <id> <key>: before -> now` for every value of the teachers' identities (`teachers_identity`) that
    differs from the copy a checkpoint holds (teachers.json): what the recipe leaves to sak, such as a teacher's
    default levels, can change with sak's version without a change to the recipe. Nothing for a checkpoint
    written before the file existed (sak before 2026-11-30)."""
    if not saved.is_file():
        return []
    try:
        before = json.loads(saved.read_text())
        if not isinstance(before, dict):
            raise ValueError(f"a JSON {type(before).__name__}, not an object")
    except ValueError as exc:  # (json.JSONDecodeError included)
        raise CheckpointError(damaged(saved.parent, exc, saved.name)) from exc
    changed = [f"teacher {t}: removed" for t in before if t not in now]
    changed += [f"teacher {t}: added" for t in now if t not in before]
    shared = [t for t in now if t in before]  # (a teacher on one side only: one entry, not one per value)
    old, new = flatten({t: before[t] for t in shared}), flatten({t: now[t] for t in shared})
    return changed + [
        f"teacher {k.replace('.', ' ', 1)}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]


def recipe_changes(saved: Path, recipe: Recipe) -> list[str]:
    """`key: before -> now` for every recipe value that differs from the copy a checkpoint holds. A key the
    saved copy lacks came with a newer sak: it is a change only when set off its default."""
    if not saved.is_file():
        return []
    try:
        before = yaml.safe_load(saved.read_text()) or {}
        if not isinstance(before, dict):
            raise ValueError(f"a YAML {type(before).__name__}, not a mapping")
    except (yaml.YAMLError, ValueError) as exc:
        raise CheckpointError(damaged(saved.parent, exc, saved.name)) from exc
    before = _flat(before)
    now = _flat(recipe.to_dict())
    default = _defaults()
    keys = sorted(k for k in before.keys() | now.keys() if not k.startswith(RESUME_KEYS))
    return [
        f"{k}: {before.get(k)!r} -> {now.get(k)!r}"
        for k in keys
        if before.get(k) != now.get(k) and (k in before or now[k] != default(k))
    ]


def _record_step(line: str) -> float:
    """The step of a samples/ record; infinity for a line cut off by a kill (dropped with the later steps)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _last_record_step(path: Path, tail: int = 1 << 20) -> float:
    """The step of a samples/ file's last record, read from its last `tail` bytes (steps only grow, so it is the
    highest); infinity for a last line cut off by a kill, or one longer than `tail`."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(size - tail, 0))
        block = f.read()
    if not block or not block.endswith(b"\n"):
        return -math.inf if not block else math.inf
    last = block[:-1].rpartition(b"\n")
    if not last[1] and size > tail:  # (the last line did not fit in the block)
        return math.inf
    return _record_step(last[2].decode("utf-8", "replace"))


def cut_sample_records(run_dir: Path, step: int) -> None:
    """On resume at `step`: drop the sample records of later steps (trained by a run that stopped before its
    next checkpoint), as RunLogger drops their metrics, so that each step's ids are listed once. A file with
    nothing to drop is left unread but for its end; one with something is streamed into its replacement (a
    long run's records are gigabytes: they were read whole, at twice their size in memory)."""
    for path in sorted((run_dir / "samples").glob("rank*.jsonl")):
        if _last_record_step(path) <= step:
            continue

        def kept(tmp: Path, path: Path = path) -> None:
            with open(path, encoding="utf-8", errors="replace") as src, open(tmp, "w", encoding="utf-8") as dst:
                dst.writelines(line for line in src if line.endswith("\n") and _record_step(line) <= step)

        write_whole(path, kept)


def record_ids(run_dir: Path, rank: int, step: int, ids: list[str]) -> None:
    """Append the sample ids this process used in `step` (traceability, and the sharding test)."""
    folder = run_dir / "samples"
    folder.mkdir(exist_ok=True)
    with open(folder / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "ids": list(ids)}) + "\n")


def record_start(recipe: Recipe, source: Path | None, step: int, extra_files: dict, finished: Path | None):
    """The main process's records of a start, once it is under way (a refused resume leaves the run's files as
    they were): later checkpoints set aside, sample records cut to `step`, recipe.yaml, run_info.json and
    teachers.json (not for
    a finished run started again, which trains nothing: recipe.yaml stays the recipe that trained it; its
    `finished` metrics and that recipe, the final checkpoint's, are written beside the run again if a kill came
    between the two or the files are another's (another run's final checkpoint resumed); a start that trains
    takes away final metrics left beside the run), and a line in starts.jsonl. Returns the folder the later
    checkpoints went to, if any."""
    run_dir, ckpt_root = recipe.run_dir, recipe.run_dir / "checkpoints"
    abandoned = None
    if source is not None:
        # resumed from an earlier checkpoint than the latest: the later ones belong to an abandoned line of
        # training, and pruning (which keeps the highest steps) would delete this run's new ones instead
        abandoned = set_aside(ckpt_root, time.strftime("abandoned-%Y%m%d-%H%M%S", time.gmtime()), after=step)
    cut_sample_records(run_dir, step)  # (all of them on a fresh start)
    if finished is None:
        for name in ("recipe.yaml", "run_info.json", TEACHERS_FILE):  # renamed into place: never half a file
            write_text_whole(run_dir / name, extra_files[name])
        # a finished run trained on (a longer schedule, or resumed from an earlier checkpoint): its final metrics
        # no longer describe the run, which a stop or a crash would leave claiming to have finished. They go with
        # the checkpoints set aside, or are dropped where the checkpoint resumed from holds the same, else are
        # kept beside the run under another name (final checkpoints of sak before 2026-11-27 hold none: this
        # file is their only copy; and which checkpoint it belongs to is not written in it).
        old = run_dir / FINAL_METRICS
        if old.is_file():
            if abandoned is not None:  # (moved, not renamed: checkpoints/ may be a link to another disk)
                shutil.move(old, abandoned / FINAL_METRICS)
            elif (
                source is not None
                and (source / FINAL_METRICS).is_file()
                and ((source / FINAL_METRICS).read_text() == old.read_text())
            ):
                old.unlink()  # (the checkpoint's own copy)
            else:
                os.replace(old, run_dir / time.strftime(f"{FINAL_METRICS}.before-%Y%m%d-%H%M%S", time.gmtime()))
    else:  # the final checkpoint's metrics and recipe beside the run: another run's final checkpoint resumed
        for name, source_file in (
            (FINAL_METRICS, finished),
            ("recipe.yaml", finished.parent / "recipe.yaml"),
            (TEACHERS_FILE, finished.parent / TEACHERS_FILE),
        ):
            copy = run_dir / name  # (its recipe is the recipe that trained it, whatever this start asks)
            if source_file.is_file() and (not copy.is_file() or copy.read_text() != source_file.read_text()):
                (run_dir / f"{name}.tmp").write_text(source_file.read_text())
                os.replace(run_dir / f"{name}.tmp", copy)
            elif name == TEACHERS_FILE and not source_file.is_file() and copy.is_file():
                copy.unlink()  # (a checkpoint of sak before teachers.json: not another start's teachers beside it)
    starts = run_dir / "starts.jsonl"
    _drop_cut_line(starts)  # a start killed while writing its line: the next one was glued onto it, both unreadable
    with writing(starts), open(starts, "a") as f:  # every start of the run, resumes included
        f.write(json.dumps({**json.loads(extra_files["run_info.json"]), "recipe": recipe.to_dict()}) + "\n")
    return abandoned


def _drop_cut_line(path: Path) -> None:
    """Cut a JSON-lines file back to its last whole line (one ending in a newline)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def prepare_run_dir(recipe: Recipe) -> Path | None:
    """The main process's first step: the checkpoint folder made, partial saves cleaned, and for a fresh run
    (`checkpoint.resume: never`) another run's checkpoints moved out of its way with their logs (tensorboard's
    folder is named after the project, wandb's offline runs are in wandb/). Returns where they went, if any."""
    run_dir, ckpt_root = recipe.run_dir, recipe.run_dir / "checkpoints"
    refuse_dangling_link(ckpt_root, "the run directory")
    ckpt_root.mkdir(parents=True, exist_ok=True)
    clean_partials(ckpt_root)
    if recipe.checkpoint.resume != "never":
        return None
    set_aside_to = set_aside(ckpt_root, time.strftime("previous-%Y%m%d-%H%M%S", time.gmtime()))
    if set_aside_to is not None:
        logs = ("metrics.jsonl", "samples", FINAL_METRICS, recipe.logging.wandb.project, "wandb")
        for log in (run_dir / name for name in logs):
            if log.exists():  # moved, not renamed: checkpoints/ may be a link to another disk (EXDEV)
                shutil.move(log, set_aside_to / log.name)
    return set_aside_to
