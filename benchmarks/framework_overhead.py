"""What the `sak` engine adds to a training step, counted instead of timed.

    python -m benchmarks.framework_overhead     # writes results/framework_overhead.{json,md}, ~2 min on CPU

The throughput benchmark times the engine against a bare loop of the same modules (target: within 3%), but
on a shared CPU two repeats of one case differ by more than that. What the engine can add to a step on a GPU
is work for the device (operations, each a kernel launch and host time) and waits for it (reading a value
back); both can be counted exactly on any machine. For each recipe, every aten call that the engine
(`sak.engine.train`) and the bare loop (`benchmarks.throughput.bare_loop`) dispatch is counted while each
runs FEW and MANY steps; the difference divided by MANY - FEW is one step's (the build, the final evaluation
and the last checkpoint cancel out). The data loader runs in a worker process, where the count does not see
it. What remains is the engine's Python between operations (logging, the progress bar), which only a timing
can measure: the engine's `step_time` ends at the optimiser step, before the step's logging, but
benchmarks/throughput.py also gives the ratio of the two loops' wall time a step (from the end of one step
to the end of the next: loading, the step and, in the engine, its logging every step).
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import sys
import tempfile
from pathlib import Path

import torch

from sak.config import load_recipe
from sak.engine import train

from .profile_gpu import VIEWS, CountOps
from .throughput import RESULTS, STAGE1, STAGE2, bare_loop

FEW, MANY = 2, 4
RECIPES = {"stage1": STAGE1, "stage2": STAGE2}


def count_run(path: Path | str, loop: str, steps: int, overrides: list[str]) -> tuple[dict, dict]:
    """The aten calls and host-waiting calls of a whole run of `steps` steps of `loop` ("bare" or "sak"),
    data loading left out, in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(
            path,
            [
                f"run.output_dir={tmp}", f"schedule.max_steps={steps}", "schedule.warmup_steps=0",
                "eval.at_start=false", "checkpoint.every=0", "logging.progress=false",
                "logging.wandb.mode=disabled", "data.num_workers=1", *overrides,
            ],
        )  # fmt: skip
        counter = CountOps()
        tolist = torch.Tensor.tolist

        def counted_tolist(tensor):
            """One host wait however the CPU's tolist dispatches (a 0-dim read or none; on a GPU: one copy)."""
            before = counter.syncs.copy()
            values = tolist(tensor)
            counter.syncs.clear()
            counter.syncs.update(before)
            counter.syncs["tolist"] += 1
            return values

        torch.Tensor.tolist = counted_tolist
        try:
            with counter:
                if loop == "bare":
                    bare_loop(recipe, steps, 0)
                else:
                    train(recipe)
        finally:
            torch.Tensor.tolist = tolist
    return dict(counter.calls), dict(counter.syncs)


def count_steps(path: Path | str, loop: str, steps: int, overrides: list[str]) -> tuple[dict, dict]:
    """`count_run` in a fresh process: what a process computes once and keeps (resize matrices, Accelerate's
    state) would otherwise fall in the first run only and not cancel out."""
    context = multiprocessing.get_context("spawn")
    queue = context.SimpleQueue()
    child = context.Process(target=_count_steps, args=(queue, str(path), loop, steps, overrides))
    child.start()  # not a Pool: its daemonic workers could not start the data loader's worker
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"counting {steps} steps of the {loop} loop on {path} failed (exit code {child.exitcode})")
    return queue.get()


def _count_steps(queue, path: str, loop: str, steps: int, overrides: list[str]) -> None:
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    queue.put(count_run(path, loop, steps, overrides))


def per_step(
    path: Path | str, loop: str, overrides: list[str], fresh: bool = True
) -> tuple[collections.Counter, collections.Counter]:
    """One step's aten calls and host-waiting calls of `loop`: (MANY steps - FEW steps) / (MANY - FEW).
    `fresh=False` counts in this process, which must have run both loops once already (the test does)."""
    count = count_steps if fresh else count_run
    few, many = (count(path, loop, n, overrides) for n in (FEW, MANY))
    result = []
    for a, b in zip(few, many, strict=True):
        diff = collections.Counter({k: (b.get(k, 0) - a.get(k, 0)) / (MANY - FEW) for k in a.keys() | b.keys()})
        result.append(collections.Counter({k: v for k, v in diff.items() if v}))
    return result[0], result[1]


def launches(calls: collections.Counter) -> float:
    return sum(n for op, n in calls.items() if op not in VIEWS)


def compare(path: Path | str, overrides: list[str] = (), fresh: bool = True) -> dict:
    """Per step: the engine's and the bare loop's aten calls, launching calls and host waits, and the
    difference by operation name (positive: the engine dispatches more)."""
    bare, bare_syncs = per_step(path, "bare", list(overrides), fresh)
    sak, sak_syncs = per_step(path, "sak", list(overrides), fresh)
    extra = collections.Counter(sak)
    extra.subtract(bare)
    return {
        "recipe": str(path),
        "overrides": list(overrides),
        "bare": {"calls": sum(bare.values()), "launching": launches(bare), "host_waits": dict(bare_syncs)},
        "sak": {"calls": sum(sak.values()), "launching": launches(sak), "host_waits": dict(sak_syncs)},
        "extra_by_op": {k: v for k, v in sorted(extra.items()) if v},
        "extra_launching": launches(sak) - launches(bare),
    }


def table(rows: dict[str, dict], command: str) -> str:
    lines = [
        "# What the sak engine adds to a training step (aten operations, counted)",
        "",
        f"`{command}`; torch {torch.__version__}. Per step, from runs of {FEW} and {MANY} steps "
        "(data loading in a worker, not counted). Launching: calls other than views, each a kernel on a GPU. "
        "Host waits: calls that make the host wait for a GPU (a value read back; the engine reads with `tolist`, "
        "counted as one wait and not as an aten call, hence its `_local_scalar_dense -1`).",
        "",
        "| recipe | bare: calls / launching / host waits | sak: calls / launching / host waits "
        "| extra launching | share of the step | extra operations |",
        "|---|---|---|---:|---:|---|",
    ]
    for name, r in rows.items():
        b, s = r["bare"], r["sak"]
        extra = ", ".join(f"{op} {n:+g}" for op, n in r["extra_by_op"].items())
        lines.append(
            f"| {name} | {b['calls']:g} / {b['launching']:g} / {sum(b['host_waits'].values()):g} "
            f"| {s['calls']:g} / {s['launching']:g} / {sum(s['host_waits'].values()):g} "
            f"| {r['extra_launching']:+g} | {r['extra_launching'] / b['launching']:.2%} | {extra} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS / "framework_overhead"), help="path without suffix")
    args = parser.parse_args(argv)
    rows = {name: compare(path) for name, path in RECIPES.items()}
    command = "python -m benchmarks.framework_overhead"
    Path(args.out).with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    text = table(rows, command)
    Path(args.out).with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
