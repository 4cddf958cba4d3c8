"""What keeping the teachers' outputs on the held-out images saves each evaluation after a run's first.

    python -m benchmarks.held_out_eval [--recipe R] [--repeats 3] [overrides ...]

Builds the recipe's teachers, student and held-out loader (default: the demo, recipes/demo/default.yaml, on
the CPU) and times `sak.engine.evaluate.evaluate` over the whole held-out split: with the teachers run each
time (`eval.keep_targets_gib: 0`), and with their outputs kept (`HeldOutTargets`, the default 1 GiB): its
first evaluation, which runs the teachers and keeps their outputs, then the later ones, which read them.
Each figure is the median of `--repeats` evaluations (the first-with-keeping one is timed once per repeat,
each with an empty store). Also records the memory the kept outputs take and that both ways score the same.
Writes benchmarks/results/held_out_eval_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from sak.config import load_recipe
from sak.engine.build import build_distill_loss, build_loader, build_student, build_tasks, build_teachers
from sak.engine.evaluate import HeldOutTargets, evaluate
from sak.engine.trainer import teacher_dtype

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo" / "default.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder the JSON and markdown go to")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    recipe = load_recipe(args.recipe, ["loss.normalize=none", *args.overrides])  # (no statistics to gather here)
    torch.manual_seed(recipe.run.seed)
    accelerator = Accelerator(cpu=True)
    device = accelerator.device
    teachers, tasks = build_teachers(recipe, device), build_tasks(recipe)
    student = build_student(recipe, teachers, tasks).to(device)
    loader = build_loader(recipe, recipe.eval.split, train=False, batch_size=recipe.eval.batch_size)
    loss, dtype = build_distill_loss(recipe), teacher_dtype(recipe)

    def timed(held_out) -> tuple[float, dict]:
        start = time.perf_counter()
        scores = evaluate(accelerator, student, teachers, loader, tasks, loss, recipe, dtype, None, held_out)
        return time.perf_counter() - start, scores

    every_time, first, later = [], [], []
    for _ in range(args.repeats):
        seconds, recomputed = timed(None)
        every_time.append(seconds)
        kept = HeldOutTargets(recipe.eval.keep_targets_gib * 2**30)
        seconds, _ = timed(kept)
        first.append(seconds)
        seconds, reread = timed(kept)
        later.append(seconds)
    images = len(loader.dataset)
    result = {
        "command": (
            "python -m benchmarks.held_out_eval " + " ".join(argv if argv is not None else sys.argv[1:])
        ).strip(),
        "recipe": Path(args.recipe).name,
        "images": images,
        "threads": torch.get_num_threads(),
        "teachers_every_time_s": statistics.median(every_time),
        "first_keeping_s": statistics.median(first),
        "later_from_kept_s": statistics.median(later),
        "kept_mib": kept.used / 2**20,
        "batches_kept": len(kept.kept),
        "batches": len(loader),
        "same_scores": reread == recomputed,
        "seconds": {"every_time": every_time, "first_keeping": first, "later_from_kept": later},
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "held_out_eval_cpu.json").write_text(json.dumps(result, indent=2))
    r = result
    md = "\n".join([
        "# Held-out evaluation with the teachers' outputs kept (CPU)",
        "",
        f"Command: `{r['command']}`; recipe `{r['recipe']}`, {images} held-out images in {r['batches']} batches, "
        f"{r['threads']} torch threads; median of {args.repeats} evaluations each.",
        "",
        "| evaluation | seconds |",
        "| --- | --- |",
        f"| teachers run each time (`eval.keep_targets_gib: 0`) | {r['teachers_every_time_s']:.2f} |",
        f"| first of a run, keeping the outputs | {r['first_keeping_s']:.2f} |",
        f"| later ones, from the kept outputs | {r['later_from_kept_s']:.2f} |",
        "",
        f"Kept: {r['batches_kept']} of {r['batches']} batches, {r['kept_mib']:.1f} MiB of host memory. The later "
        f"evaluations score {'exactly' if r['same_scores'] else 'NOT'} as the recomputing one.",
        "",
    ])  # fmt: skip
    (args.results / "held_out_eval_cpu.md").write_text(md)
    print(md)
    return 0 if r["same_scores"] else 1


if __name__ == "__main__":
    sys.exit(main())
