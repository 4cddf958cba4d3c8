"""AdamW's step on a recipe's student: the fused kernel (`optim.fused: true`, the default) against PyTorch's
default implementation (`optim.fused: false`: the multi-tensor `foreach` path on CUDA, a loop over the
parameters on the CPU).

    python -m benchmarks.optimizer_step [--recipe recipes/demo/default.yaml] [--steps 30]

Random gradients on every trainable parameter; median time of `optimizer.step()` after 5 warm-up steps.
Writes benchmarks/results/optimizer_step_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sak.config import load_recipe
from sak.engine.build import build_optimizer, build_student, build_tasks, build_teachers

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def step_time(recipe, student: torch.nn.Module, steps: int) -> float:
    optimizer = build_optimizer(recipe, student)
    params = [p for p in student.parameters() if p.requires_grad]
    generator = torch.Generator(device=params[0].device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, device=p.device) * 1e-3
    times = []
    for i in range(5 + steps):
        if params[0].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        if params[0].is_cuda:
            torch.cuda.synchronize()
        if i >= 5:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", nargs="+", default=["recipes/demo/default.yaml", "recipes/bench/stage2_cpu.yaml"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder the JSON and markdown go to")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for path in args.recipe:
        times = {}
        for fused in (True, False):
            recipe = load_recipe(
                Path(path) if Path(path).exists() else ROOT / path, [f"optim.fused={str(fused).lower()}"]
            )
            torch.manual_seed(0)
            teachers = build_teachers(recipe, device)
            student = build_student(recipe, teachers, build_tasks(recipe)).to(device)
            times[fused] = step_time(recipe, student, args.steps)
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        tensors = sum(1 for p in student.parameters() if p.requires_grad)
        rows.append({"recipe": path, "parameters": trainable, "tensors": tensors,
                     "fused_s": times[True], "default_s": times[False]})  # fmt: skip
        print(f"{path}: default {times[False] * 1e3:.2f} ms, fused {times[True] * 1e3:.2f} ms", flush=True)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    args.results.mkdir(parents=True, exist_ok=True)
    meta = {"device": where, "torch": torch.__version__}
    (args.results / f"optimizer_step_{device.type}.json").write_text(json.dumps(meta | {"results": rows}, indent=2))
    lines = [
        f"# AdamW step, fused against PyTorch's default ({where}, torch {torch.__version__})",
        "",
        f"Command: `python -m benchmarks.optimizer_step {' '.join(argv if argv is not None else sys.argv[1:])}`;",
        "median of `optimizer.step()` over the timed steps, random gradients on every trainable parameter.",
        "",
        "| recipe's student | trainable parameters | tensors | default (ms) | fused (ms) | speed-up |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['parameters'] / 1e6:.2f} M | {r['tensors']} | {r['default_s'] * 1e3:.2f} "
            f"| {r['fused_s'] * 1e3:.2f} | {r['default_s'] / r['fused_s']:.1f}x |"
        )
    md = "\n".join(lines) + "\n"
    (args.results / f"optimizer_step_{device.type}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
