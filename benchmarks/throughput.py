"""Training-step throughput: a `sak` step (the full engine) against a bare PyTorch loop built from the
same modules (same student, teachers, loss, optimiser, precision), on CPU by default.

    python -m benchmarks.throughput [--recipe R] [--steps N] [--warmup W] [overrides ...]

Writes benchmarks/results/throughput_<device>.json and .md. The step time is the median over the
steps after warm-up; images/s = global batch / median step time.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sak.config import load_recipe
from sak.engine import train
from sak.engine.build import (
    build_distill_loss,
    build_loader,
    build_optimizer,
    build_student,
    build_tasks,
    build_teachers,
)
from sak.engine.step import compute_losses, teacher_targets
from sak.engine.trainer import teacher_dtype

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT = Path(__file__).resolve().parents[1] / "recipes" / "demo" / "default.yaml"


def bare_loop(recipe, steps: int, warmup: int) -> list[float]:
    """The same step with no framework: no Accelerate, no logging, no checkpointing."""
    torch.manual_seed(recipe.run.seed)
    teachers = build_teachers(recipe, torch.device("cpu"))
    tasks = build_tasks(recipe)
    student = build_student(recipe, teachers, tasks).train()
    optimizer = build_optimizer(recipe, student)
    loss_fn = build_distill_loss(recipe)
    loader = build_loader(recipe, recipe.data.split, train=True)
    dtype = teacher_dtype(recipe)
    times, batches = [], iter(loader)
    for _ in range(warmup + steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        start = time.perf_counter()
        targets = teacher_targets(teachers, batch["image"], dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.precision.mixed == "bf16"):
            out = student(batch["image"])
        losses = compute_losses(out, targets, batch, tasks, loss_fn, recipe.loss.alpha if tasks else 1.0)
        losses.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[warmup:]


def sak_loop(recipe, steps: int, warmup: int) -> list[float]:
    """The engine's own per-step timing (data loading excluded, as in the bare loop)."""
    train(recipe)
    rows = [json.loads(x) for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time"] for r in rows if "step_time" in r][warmup:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(DEFAULT))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"run.output_dir={tmp}", f"schedule.max_steps={args.steps + args.warmup}", "logging.every=1",
            "logging.progress=false", "logging.wandb.mode=disabled", "checkpoint.every=0", "eval.batches=1",
            "eval.at_start=false", *args.overrides,
        ]  # fmt: skip
        recipe = load_recipe(args.recipe, overrides)
        bare = bare_loop(recipe, args.steps, args.warmup)
        framework = sak_loop(recipe, args.steps, args.warmup)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    global_batch = recipe.data.batch_size
    med_bare, med_sak = statistics.median(bare), statistics.median(framework)
    result = {
        "recipe": args.recipe,
        "overrides": args.overrides,
        "device": device,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "global_batch": global_batch,
        "image_size": recipe.data.image_size,
        "precision": recipe.precision.mixed,
        "steps_timed": args.steps,
        "bare_step_s": med_bare,
        "sak_step_s": med_sak,
        "bare_images_per_s": global_batch / med_bare,
        "sak_images_per_s": global_batch / med_sak,
        "sak_over_bare": med_sak / med_bare,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"throughput_{tag}.json").write_text(json.dumps(result, indent=2))
    table = (
        f"# Training-step throughput ({device}, torch {torch.__version__})\n\n"
        f"Recipe `{Path(args.recipe).name}` {' '.join(args.overrides)}, batch {global_batch}, "
        f"{recipe.data.image_size} px, precision {recipe.precision.mixed}; median of {args.steps} steps after "
        f"{args.warmup} warm-up steps. Command: `python -m benchmarks.throughput {' '.join(argv or sys.argv[1:])}`\n\n"
        "| loop | step time (s) | images/s |\n| --- | --- | --- |\n"
        f"| bare PyTorch | {med_bare:.4f} | {global_batch / med_bare:.1f} |\n"
        f"| sak engine | {med_sak:.4f} | {global_batch / med_sak:.1f} |\n\n"
        f"sak / bare step time: {med_sak / med_bare:.3f}. Peak resident memory of the process: "
        f"{result['peak_rss_gib']:.2f} GiB.\n"
    )
    (RESULTS / f"throughput_{tag}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
