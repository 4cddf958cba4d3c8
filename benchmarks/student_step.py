"""Where a cached training step's time goes: the student's ViT alone, then the adapter paths, the losses and
the optimiser added one at a time, each eager and torch.compile'd.

    python -m benchmarks.student_step [--recipe recipes/demo/default.yaml] [--steps 20] [--warmup 5] [overrides]

A step from the feature cache runs no teacher, so its speed is the student's: the issue's FLOP bound for
the cache assumes that step turns FLOPs into time as fast as the teachers do, and on the H200 it ran at a
third of their rate (docs/benchmarks.md). This splits the step into four nested variants on one batch of
the recipe's loader, the teachers' outputs for it computed once and rounded through fp16 as the cache
stores them:

- `vit`: the stem alone (the student's truncated timm ViT: patch embedding and blocks), forward and
  backward of the mean square of its last block's tokens;
- `student`: the whole student forward (stem, every teacher's adapter path, aligners, maps; stage 2 adds
  routers and heads), backward of the mean square of every output;
- `student + losses`: the recipe's distillation (and task) losses instead, as the engine computes them,
  the targets normalised first when the recipe sets `loss.normalize` (statistics updated every step, as
  the engine does until `loss.normalize_until`);
- `step`: and the optimiser's step (and gradient clipping, if the recipe sets it): a whole cached step.

Each under the recipe's autocast, gradients dropped after each step (`zero_grad(set_to_none=True)`), one
host sync per step; the median of `--steps` after `--warmup`. Compiled: `precision.compile_student` as the
engine applies it (`student.compile()`; the distillation loss too when the recipe or an override sets
`precision.compile_losses`; the task losses and the optimiser eager), and the `vit` variant's forward
compiled on its own, all in the recipe's `precision.compile_mode` (with CUDA graphs, each step's start is
marked as the trainer marks it). FLOPs are counted once per variant on the eager modules (torch.utils.flop_counter,
attention included on the CPU: benchmarks/flops.py). The difference between two rows is what the added
part costs; TFLOP/s per row says how well the whole of it uses the machine. Writes
benchmarks/results/student_step_<device>.{json,md} (or `--name`); with `--profile`, also the operators and
kernels of 3 whole steps by their own device time (<name>_profile.txt), to see which kernels the parts
spend their time on.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from sak.config import CUDA_GRAPH_MODES, load_recipe
from sak.engine.build import (
    build_distill_loss,
    build_loader,
    build_optimizer,
    build_student,
    build_target_normalizers,
    build_tasks,
    build_teachers,
)
from sak.engine.malloc import keep_freed_memory
from sak.engine.step import begin_step, compute_losses, teacher_targets
from sak.engine.trainer import teacher_dtype
from sak.teachers import TeacherOutput

from .flops import flop_counter
from .throughput import peak_bf16

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("vit", "student", "student + losses", "step")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def mean_square(tensors) -> torch.Tensor:
    return sum(t.float().square().mean() for t in tensors)


class Variants:
    """The four nested steps on one batch; `run(name)` is one training step of variant `name`."""

    def __init__(self, recipe, dev: torch.device) -> None:
        torch.manual_seed(recipe.run.seed)
        teachers = build_teachers(recipe, dev)
        self.tasks = build_tasks(recipe)
        self.student = build_student(recipe, teachers, self.tasks).train().to(dev)
        batch = next(iter(build_loader(recipe, recipe.data.split, train=True)))
        self.batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.no_grad():  # as the cache holds them: fp16, widened to float32 on the device
            targets = teacher_targets(teachers, self.batch["image"], teacher_dtype(recipe))
            self.targets = {
                t: TeacherOutput(tuple(x.half().float() for x in out.levels), out.summary) for t, out in targets.items()
            }
        self.normalizers = build_target_normalizers(recipe, teachers)
        if self.normalizers is not None:
            self.normalizers.to(dev)
        self.step = 0  # the normalisers' step: their statistics keep growing, as in training before normalize_until
        del teachers, targets
        self.loss_fn = build_distill_loss(recipe, compiled=False)  # compiled with the student, if the recipe says
        self.compile_losses = recipe.precision.compile_losses
        self.compile_options = recipe.precision.compile_options
        self.cuda_graphs = False  # until compiled in a mode with CUDA graphs (marks each step's start, as the trainer)
        self.alpha = recipe.loss.alpha if self.tasks else 1.0
        self.optimizer = build_optimizer(recipe, self.student)
        self.clip = recipe.optim.grad_clip
        mixed = recipe.precision.mixed
        self.autocast = dict(
            device_type=dev.type, dtype=torch.float16 if mixed == "fp16" else torch.bfloat16, enabled=mixed != "no"
        )
        self.vit_forward = self._vit_forward

    def _vit_forward(self, images: torch.Tensor) -> torch.Tensor:
        _, outs, _ = self.student.stem.run(self.student.preprocess(images))
        return outs[-1]

    def compile(self) -> None:
        options = self.compile_options  # precision.compile_mode
        self.student.compile(**options)  # precision.compile_student, as sak.engine.build.prepare_student applies it
        if self.compile_losses:  # precision.compile_losses, as sak.engine.build.build_distill_loss applies it
            self.loss_fn.compile(**options)
        self.vit_forward = torch.compile(self._vit_forward, **options)
        self.cuda_graphs = self.compile_options.get("mode") in CUDA_GRAPH_MODES

    def normalized_targets(self) -> dict:
        if self.normalizers is None:
            return self.targets
        self.normalizers.update(self.targets, self.step)
        self.step += 1
        return self.normalizers(self.targets)

    def run(self, name: str) -> None:
        begin_step(self.cuda_graphs)
        if name == "normalizers":  # not a variant: what `loss.normalize` adds to `student + losses`
            next(iter(self.normalized_targets().values())).levels[0].sum().item()
            return
        images = self.batch["image"]
        with torch.autocast(**self.autocast):
            if name == "vit":
                loss = mean_square([self.vit_forward(images)])
            else:
                out = self.student(images)
        if name == "student":
            loss = mean_square([f for levels in out.features.values() for f in levels] + list(out.tasks.values()))
        elif name != "vit":
            targets = self.normalized_targets()
            loss = compute_losses(out, targets, self.batch, self.tasks, self.loss_fn, self.alpha).total
        loss.backward()
        if name == "step":
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()  # one host sync a step, as the engine reads its loss


def median_ms(variants: Variants, name: str, steps: int, warmup: int, dev: torch.device) -> float:
    times = []
    for i in range(warmup + steps):
        sync(dev)
        start = time.perf_counter()
        variants.run(name)
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def kernel_table(variants: Variants, dev: torch.device, steps: int = 3, rows: int = 30) -> str:
    """torch.profiler's operators and kernels over `steps` whole cached steps (the `step` variant, compiled if
    it was), sorted by their own device time (CPU time on the CPU): which kernels a cached step spends on."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            variants.run("step")
        sync(dev)
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=90)


def measure(
    recipe_path: str, overrides: list[str], steps: int, warmup: int, compiled: bool, profile: bool = False
) -> dict:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # (a path taken as given where it exists, else from the repository's root, as the other benchmarks take it)
    recipe = load_recipe(recipe_path if Path(recipe_path).exists() else ROOT / recipe_path, overrides)
    if dev.type == "cpu" and recipe.run.tune_malloc:
        keep_freed_memory()  # as the engine does on the CPU (sak/engine/malloc.py)
    variants = Variants(recipe, dev)
    flops = {}
    for name in VARIANTS:  # counted eager; compiling changes no FLOP
        with flop_counter() as counter:
            variants.run(name)
        flops[name] = counter.get_total_flops()
    rows = {name: {"flop": flops[name], "eager_ms": median_ms(variants, name, steps, warmup, dev)} for name in VARIANTS}
    normalizer_ms = None
    if variants.normalizers is not None:  # the targets' normalisation alone, part of `student + losses`
        normalizer_ms = median_ms(variants, "normalizers", steps, warmup, dev)
    if compiled:
        variants.compile()
        for name in VARIANTS:
            rows[name]["compiled_ms"] = median_ms(variants, name, steps, warmup, dev)
    profile_table = kernel_table(variants, dev) if profile else None
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else None
    peak = peak_bf16(gpu)
    for row in rows.values():
        for mode in ("eager", "compiled"):
            if f"{mode}_ms" in row:
                row[f"{mode}_tflops"] = row["flop"] / row[f"{mode}_ms"] / 1e9
                if peak:
                    row[f"{mode}_mfu"] = row["flop"] / (row[f"{mode}_ms"] / 1000) / peak
    return {
        "recipe": recipe_path,
        "overrides": overrides,
        "batch": int(variants.batch["image"].shape[0]),
        "image_size": list(variants.batch["image"].shape[-2:]),
        "precision": recipe.precision.mixed,
        "device": gpu or f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "steps": steps,
        "warmup": warmup,
        "variants": rows,
        "normalize": recipe.loss.normalize,
        "normalizer_ms": normalizer_ms,
        "profile": profile_table,
    }


def table(r: dict) -> list[str]:
    modes = [m for m in ("eager", "compiled") if f"{m}_ms" in r["variants"]["vit"]]
    mfu = "eager_mfu" in r["variants"]["vit"]
    head = ["variant", "GFLOP / step"]
    for m in modes:
        head += [f"{m} ms", f"{m}: added ms", f"{m} TFLOP/s"] + ([f"{m} MFU"] if mfu else [])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    previous = None
    for name, row in r["variants"].items():
        cells = [name, f"{row['flop'] / 1e9:.1f}"]
        for m in modes:
            added = "-" if previous is None else f"{row[f'{m}_ms'] - previous[f'{m}_ms']:+.1f}"
            cells += [f"{row[f'{m}_ms']:.1f}", added, f"{row[f'{m}_tflops']:.2f}"]
            cells += [f"{row[f'{m}_mfu']:.0%}"] if mfu else []
        lines.append("| " + " | ".join(cells) + " |")
        previous = row
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/demo/default.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled runs")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--name", help="file stem (default student_step_<device type>)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile 3 whole steps (compiled, unless --eager-only): <name>_profile.txt",
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = parser.parse_args(argv)
    r = measure(args.recipe, args.overrides, args.steps, args.warmup, not args.eager_only, args.profile)
    command = f"python -m benchmarks.student_step {' '.join(argv if argv is not None else sys.argv[1:])}".strip()
    r["command"] = command
    name = args.name or f"student_step_{'cuda' if torch.cuda.is_available() else 'cpu'}"
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    profile_table = r.pop("profile")
    if profile_table is not None:
        (out / f"{name}_profile.txt").write_text(f"{command}\n\n{profile_table}\n")
    (out / f"{name}.json").write_text(json.dumps(r, indent=2))
    lines = [
        f"# A cached training step, part by part ({r['device']}, torch {r['torch']})",
        "",
        f"Command: `{command}`. {r['recipe']}{' ' + ' '.join(r['overrides']) if r['overrides'] else ''}: batch "
        f"{r['batch']}, {r['image_size'][0]} x {r['image_size'][1]} px, precision {r['precision']}; median of "
        f"{r['steps']} steps after {r['warmup']}. Each row adds a part to the row above (see the docstring of "
        "benchmarks/student_step.py); `added ms` is what that part costs.",
        "",
        *table(r),
    ]
    if r["normalizer_ms"] is not None:
        lines += [
            "",
            f"Of `student + losses`, the targets' normalisation (`loss.normalize: {r['normalize']}`: statistics "
            f"updated, map rebuilt and applied, as every step until `loss.normalize_until`): {r['normalizer_ms']:.1f} ms "
            "(eager).",
        ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
