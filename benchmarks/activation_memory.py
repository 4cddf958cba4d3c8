"""What `student.grad_checkpointing` saves: the bytes autograd keeps from the student's forward for backward,
per image (the slope between two batch sizes) and fixed, without and with recomputing the stem's blocks, at the
GPU recipes' real shapes.

    python -m benchmarks.activation_memory [--recipes recipes/bench/stage1_gpu_vitb.yaml ...] [--batch 1]

Counted on the CPU under the recipe's autocast: every tensor autograd saves while the student's forward
runs (a `saved_tensors_hooks` pack hook; each storage once), which is what a training step holds between
its forward and its backward besides the weights, gradients and optimiser state (the teachers are built
for their levels' widths only; nothing of theirs is counted). Beside it, the CPU time of
one forward + backward of the student alone with and without checkpointing (the recomputation's cost;
one image, noisy). On a GPU, peak memory is `torch.cuda.max_memory_allocated` in benchmarks/throughput.py
(case gpu/stage2/sak/online/grad-checkpointing). Writes benchmarks/results/activation_memory.{json,md}.
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
from sak.engine.build import build_loader, build_student, build_tasks, build_teachers

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RECIPES = ["recipes/bench/stage1_gpu_vitb.yaml", "recipes/bench/stage2_gpu_vitb.yaml"]


def saved_bytes(fn) -> tuple[int, object]:
    """Bytes of the tensors autograd keeps for backward while `fn` runs (each storage once), and fn's result."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(storages.values()), result


def forward_pass(path: str, batch: int, on: bool):
    """The recipe's student (grad checkpointing `on`) and a function running its forward on one batch to a loss."""
    overrides = [f"data.batch_size={batch}", "data.num_workers=0", f"student.grad_checkpointing={str(on).lower()}"]
    recipe = load_recipe(Path(path) if Path(path).exists() else ROOT / path, overrides)
    torch.manual_seed(0)
    tasks = build_tasks(recipe)
    student = build_student(recipe, build_teachers(recipe, torch.device("cpu")), tasks).train()
    images = next(iter(build_loader(recipe, recipe.data.split, train=True)))["image"]
    mixed = recipe.precision.mixed

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed == "bf16"):
            out = student(images)
        return sum(t.float().square().mean() for levels in out.features.values() for t in levels) + sum(
            t.float().square().mean() for t in out.tasks.values()
        )

    return recipe, student, forward


def measure(path: str, batch: int, repeats: int) -> dict:
    """Bytes kept at `batch` and at 2 x `batch`: their slope is what each image adds, the rest is fixed (the
    weights autograd saves for their gradients and autocast's bf16 copies of them, which the pack hook also sees,
    do not grow with the batch); the CPU time of a forward + backward at `batch`."""
    row = {"recipe": path, "batch": batch}
    for on in (False, True):
        key = "checkpointing" if on else "plain"
        kept = {}
        for size in (2 * batch, batch):
            recipe, student, forward = forward_pass(path, size, on)
            kept[size], loss = saved_bytes(forward)
            del loss
        loss = forward()
        loss.backward()
        times = []
        for _ in range(repeats):
            student.zero_grad(set_to_none=True)
            start = time.perf_counter()
            forward().backward()
            times.append(time.perf_counter() - start)
        per_image = (kept[2 * batch] - kept[batch]) / batch
        row[f"{key}_mib_per_image"] = per_image / 2**20
        row[f"{key}_mib_fixed"] = (kept[batch] - per_image * batch) / 2**20
        row[f"{key}_s"] = statistics.median(times)
        row["image_size"] = recipe.data.image_size
        row["precision"] = recipe.precision.mixed
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    rows = [measure(path, args.batch, args.repeats) for path in args.recipes]
    command = f"python -m benchmarks.activation_memory {' '.join(argv if argv is not None else sys.argv[1:])}".strip()
    result = {"command": command, "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "activation_memory.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# What the student's forward keeps for backward, per image (CPU, torch {result['torch']})",
        "",
        f"Command: `{command}`. Tensors saved for backward while the student's forward runs, under the recipe's",
        "autocast, each storage once; CPU time of the student's forward + backward (median of "
        f"{args.repeats}, {result['threads']} threads). See the docstring of benchmarks/activation_memory.py.",
        "",
        f"Per image: the slope between batch {args.batch} and {2 * args.batch}; fixed: what does not grow with the",
        "batch (the weights autograd saves and autocast's bf16 copies of them, seen by the same hook).",
        "",
        "| recipe | image | precision | kept, plain (MiB / image + fixed) | kept, grad_checkpointing (MiB / image +"
        " fixed) | ratio per image | fwd + bwd plain (s) | fwd + bwd checkpointing (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['image_size']} | {r['precision']} | {r['plain_mib_per_image']:.0f} + "
            f"{r['plain_mib_fixed']:.0f} | {r['checkpointing_mib_per_image']:.0f} + {r['checkpointing_mib_fixed']:.0f} | "
            f"{r['checkpointing_mib_per_image'] / r['plain_mib_per_image']:.2f} | {r['plain_s']:.2f} | "
            f"{r['checkpointing_s']:.2f} |"
        )
    (out / "activation_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
