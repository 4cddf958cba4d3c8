"""What a run records: a JSONL metrics file, Accelerate trackers (wandb offline by default,
tensorboard), a progress bar, and the run info (versions, git revision) next to the checkpoints."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..config import Recipe
from ..files import write_text_whole, writing

PACKAGES = ("sak", "torch", "torchvision", "timm", "open_clip_torch", "transformers", "segment-anything", "accelerate")


def git_revision() -> str | None:
    """The revision of the code that runs (`+dirty` when uncommitted changes exist), or None when this code
    is not in a git checkout (an installed package: `versions["sak"]` in run_info says which one runs).

    The checkout must track this very file: an installed copy inside some other project's repository (a
    virtual environment in a project folder) would otherwise report that project's revision."""
    here = Path(__file__).resolve().parent
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "--error-unmatch", str(Path(__file__).resolve())],
            cwd=here, capture_output=True, text=True, timeout=5,
        )  # fmt: skip
        if tracked.returncode != 0:
            return None
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(  # changed tracked files only: results or predictions written in the checkout
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )  # are not a change to the code
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_info(recipe: Recipe, world_size: int) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "seed": recipe.run.seed,
        "world_size": world_size,
        "git_revision": git_revision(),
        "versions": versions,
        "python": platform.python_version(),
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def flatten(d: dict, prefix: str = "", split_lists: bool = False) -> dict:
    """Nested recipe -> {"optim.lr": 0.001, ...}; with `split_lists`, lists of sections (teachers, tasks) by
    index ("teachers.0.image_size"), so that a value inside one compares on its own."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + ".", split_lists))
        elif split_lists and isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, item in enumerate(v):
                out.update(flatten(item, f"{key}.{i}.", split_lists))
        else:
            out[key] = v
    return out


def flat_config(d: dict) -> dict:
    """Nested recipe -> {"optim.lr": 0.001, ...} with lists as strings and None as "" (what trackers accept)."""
    scalar = (int, float, str, bool)
    return {k: "" if v is None else v if isinstance(v, scalar) else str(v) for k, v in flatten(d).items()}


def _step(line: str) -> float:
    """A metrics.jsonl line's step; a line the interrupted run did not finish writing (a kill, a full disk)
    counts as after any checkpoint, so it is dropped."""
    try:
        step = json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf
    return step if type(step) in (int, float) else math.inf  # (a step of another type: a line edited by hand)


class GpuPeak:
    """Peak GPU memory in metrics.jsonl on a GPU: `torch.cuda.max_memory_allocated` of the main process's device,
    in GiB; a training row's `gpu_peak_gib` over the steps since the previous training row (the first: setup
    included), an evaluation row's `eval_gpu_peak_gib` over that evaluation alone (the steps before it carried to
    the next training row). Two keys, as a training and an evaluation row can share a step, where trackers keep
    one value per key. Nothing on a CPU. Reading and resetting the counters is host-side: no wait for the GPU."""

    def __init__(self, device) -> None:
        self.device = device if device.type == "cuda" else None
        self.carried = 0.0

    def _take(self) -> float:
        import torch

        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak

    def steps(self) -> dict[str, float]:
        """For a training row."""
        if self.device is None:
            return {}
        peak, self.carried = max(self._take(), self.carried), 0.0
        return {"gpu_peak_gib": round(peak, 3)}

    def evaluation(self, evaluate) -> tuple[dict[str, float], dict[str, float]]:
        """`evaluate()`'s metrics, and what the evaluation row adds to them."""
        if self.device is not None:
            self.carried = max(self.carried, self._take())
        metrics = evaluate()
        return metrics, {} if self.device is None else {"eval_gpu_peak_gib": round(self._take(), 3)}


def _evaluation(line: str) -> bool:
    """Whether a metrics.jsonl line is an evaluation's (its values `val/...`)."""
    return any(key.startswith("val/") for key in json.loads(line))


def json_safe(value):
    """NaN and infinity as None (null), in nested dicts and lists: JSON has no such numbers, and Python's
    json writes a bare NaN, which strict readers refuse. (A metric that scores nothing is NaN by design.)"""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def nan_for_null(row: dict) -> dict:
    """A record written through `json_safe`, its nulls read back as NaN (the values it logged)."""
    return {k: math.nan if v is None else v for k, v in row.items()}


def wandb_run_id(folder: Path, continues: bool) -> str:
    """One wandb run for a sak run, resumes included: its id is kept in the run's wandb folder (set aside with
    it by a fresh start), read again by a start that continues the run, and new for one that does not. Each
    start opened a run of its own before, so a resumed run's curves came in pieces."""
    import secrets

    path = folder / "sak_run_id"
    if continues and path.is_file() and (kept := path.read_text().strip()):  # (empty: a start killed writing it)
        return kept
    folder.mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(8)  # (wandb's ids: letters and digits)
    write_text_whole(path, run_id + "\n")  # whole or absent: an empty id would be handed to wandb
    return run_id


class RunLogger:
    """Main-process logging; other processes get a logger that only forwards to the accelerator."""

    def __init__(self, accelerator, recipe: Recipe, total_steps: int, start_step: int, trains: bool = True) -> None:
        """`trains`: False for a start that will train and log nothing (a finished run, or one at its
        run.stop_at), which then opens no tracker run (an empty wandb run to sync)."""
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = recipe.run_dir / "metrics.jsonl"
        self.bar = None
        # the final checkpoint resumed to evaluate, again: the rows an evaluation that failed before its metrics
        # reached the checkpoint logged (a full disk, a kill) are dropped, here and from tensorboard
        evaluates_again = bool(trains and start_step and start_step == total_steps)
        kept: list[str] = []
        if self.main and self.path.exists():  # a fresh run starts a new file; a resumed one drops what
            # the interrupted run logged after its checkpoint
            text = self.path.read_text()
            lines = text.splitlines()
            kept = [ln for ln in lines if start_step and _step(ln) <= start_step]
            if evaluates_again:
                kept = [ln for ln in kept if not (_step(ln) == start_step and _evaluation(ln))]
            if kept != lines or (text and not text.endswith("\n")):  # replaced whole: a kill keeps the old file
                write_text_whole(self.path, "".join(ln + "\n" for ln in kept))
        if self.main and recipe.logging.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=recipe.run.name, dynamic_ncols=True)
        trackers = []
        if recipe.logging.wandb.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            trackers.append("wandb")
        if recipe.logging.tensorboard:
            trackers.append("tensorboard")
        if trackers and trains:  # at the start, so that a tracker that cannot start stops the run before step 1
            wandb = {"mode": recipe.logging.wandb.mode, "dir": str(recipe.run_dir), "name": recipe.run.name}
            if "wandb" in trackers and self.main:  # (Accelerate starts trackers on the main process only)
                wandb.update(id=wandb_run_id(recipe.run_dir / "wandb", continues=start_step > 0), resume="allow")
            accelerator.init_trackers(
                recipe.logging.wandb.project,
                config=flat_config(recipe.to_dict()),
                init_kwargs={
                    "wandb": wandb,
                    # as metrics.jsonl: events after the checkpoint resumed from (all, on a fresh start) are dropped;
                    # evaluating the final one again, its own step's too (its training row is logged again below)
                    "tensorboard": {"purge_step": start_step + int(not evaluates_again) if start_step else 0},
                },
            )
            if evaluates_again and "tensorboard" in trackers and self.main:
                for line in (ln for ln in kept if _step(ln) == start_step):  # (the evaluation's rows are not kept)
                    row = nan_for_null(json.loads(line))
                    accelerator.get_tracker("tensorboard").log(
                        {k: v for k, v in row.items() if k != "step"}, start_step
                    )
        self.trackers = bool(trackers and trains)

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.trackers:
            self.accelerator.log(values, step=step)
        if self.main:
            with writing(self.path), open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **json_safe(values)}) + "\n")

    def progress(self, steps: int, postfix: dict[str, float]) -> None:
        if self.bar is not None:  # (the postfix first: update draws the bar, with the postfix it has then)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(steps)

    def message(self, text: str) -> None:
        if self.main:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self, exit_code: int = 0) -> None:
        """The bar and the trackers closed; `exit_code` is what wandb records for the run (not 0: failed; its own
        finish() says 0, finished, where the run ends by an exception that has not reached wandb's hooks yet)."""
        if self.bar is not None:
            self.bar.close()
        if self.trackers:
            # the trackers alone: Accelerate's end_training also destroys the process group, which the launch owns
            # (a second train() in the process, or any collective after it, failed on every rank with a tracker on)
            for tracker in self.accelerator.trackers:
                if exit_code and tracker.name == "wandb":
                    tracker.run.finish(exit_code=exit_code)
                else:
                    tracker.finish()
            self.accelerator.trackers = []
