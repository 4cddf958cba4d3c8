"""What the benchmarks that time several ways of computing one thing share (sam_attention, router_mix,
adapter_paths): the timer, the common arguments, the results' header, the ways' table and the files."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: torch.device, repeats: int, warmup: int) -> float:
    times = []
    for i in range(warmup + repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def header(module: str, argv: list[str] | None, args: argparse.Namespace, device: torch.device) -> dict:
    """What a results file of this benchmark family starts with: the device, torch, the command, the arguments."""
    return {
        "device": describe(device),
        "torch": torch.__version__,
        "command": f"python -m benchmarks.{module} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": {k: v for k, v in vars(args).items() if k != "results"},
    }


def write_results(folder: Path, stem: str, result: dict, text: str) -> None:
    """folder/stem.json (the result) and folder/stem.md (its table)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / f"{stem}.md").write_text(text)
    print(f"wrote {folder / stem}.json and .md")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    return f"CPU, {torch.get_num_threads()} threads of {os.cpu_count()}"


def add_arguments(parser: argparse.ArgumentParser, results: Path, repeats: int = 10, warmup: int = 3) -> None:
    """--repeats, --warmup, --no-compile (the `compile` flag), --device and --results."""
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results", type=Path, default=results)


def time_ways(
    ways: dict[str, Callable],
    step: Callable[[Callable], None],
    outputs: Callable[[Callable], list[Tensor]],
    reference: list[Tensor],
    device: torch.device,
    repeats: int,
    warmup: int,
) -> list[dict]:
    """Per way: the median time of `step(way)` and the largest absolute difference of `outputs(way)` from
    `reference` (taken with gradients on, as timed: a compiled way would compile again without them)."""
    rows = []
    for name, fn in ways.items():
        seconds = median_time(lambda fn=fn: step(fn), device, repeats, warmup)
        got = [x.detach() for x in outputs(fn)]
        difference = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, reference, strict=True))
        rows.append({"way": name, "seconds": seconds, "max_abs_difference": difference})
        print(f"{name}: {seconds * 1e3:.2f} ms, difference {difference:.1e}", flush=True)
    return rows


def ways_table(rows: list[dict]) -> list[str]:
    lines = ["| way | ms | difference |", "| --- | --- | --- |"]
    return lines + [f"| {r['way']} | {r['seconds'] * 1e3:.2f} | {r['max_abs_difference']:.1e} |" for r in rows]
