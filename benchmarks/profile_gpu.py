"""Where a GPU training step spends its time: per phase, the GPU time (CUDA events), the host time (the
Python side launching the work) and the operations dispatched; then the most expensive kernels of one step.

    python -m benchmarks.profile_gpu [--recipe recipes/bench/stage2_gpu_vitb.yaml] [--steps 5] [overrides]

Phases of the bare step (the same modules the engine runs): each teacher's forward, the student's
forward, the losses, backward, optimiser step. A phase whose host time reaches its GPU time is bound by
launching work, not by the GPU's arithmetic (unless it synchronises: the host time includes any wait for
the GPU, e.g. in a `.item()`): fewer, larger operations (torch.compile, teachers' weights cast once) help
there, faster kernels do not. The operation counts are aten calls as dispatched
(TorchDispatchMode), with and without the view-like ones that launch no kernel, and the calls that make
the host wait for the GPU (reading a value, data-sized outputs, tensors made from Python data). On a machine without
CUDA (`--device cpu`) the same table has host times and counts only.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sak.config import Recipe, load_recipe
from sak.engine.build import (
    build_distill_loss,
    build_loader,
    build_optimizer,
    build_student,
    build_target_normalizers,
    build_tasks,
    build_teachers,
    prepare_student,
)
from sak.engine.step import begin_step, compute_losses
from sak.engine.trainer import teacher_dtype


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", action="append")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sort", default="cuda_time_total", help="key_averages column, e.g. self_cuda_time_total")
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--reference", action="store_true", help="also time bare timm models (what the GPU can do)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the phase tables to this JSON file")
    args = parser.parse_args(argv)
    tables = []
    if args.reference:
        reference()
    for path in args.recipe or ["recipes/bench/stage1_gpu_vitb.yaml", "recipes/bench/stage2_gpu_vitb.yaml"]:
        tables.append(profile_recipe(path, args.steps, args.overrides, args.sort, args.rows, torch.device(args.device)))
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__}
        meta["command"] = "python -m benchmarks.profile_gpu " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.json).write_text(json.dumps(meta | {"recipes": tables}, indent=2))
    return 0


def reference() -> None:
    """Bare timm ViT-B/16 forward + backward at 384 (batch 16) and SAM-B forward at 1024, in bf16."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    for name, size, batch, train in [
        ("vit_base_patch16_384", 384, 16, True),
        ("samvit_base_patch16", 1024, 16, False),
        ("vit_base_patch14_dinov2", 378, 16, False),
    ]:
        model = timm.create_model(name, pretrained=False, num_classes=0, img_size=size).cuda().train(train)
        x = torch.randn(batch, 3, size, size, device="cuda")

        def run(model=model, x=x, train=train):
            with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(train):
                y = model.forward_features(x)
            if train:
                y.float().mean().backward()

        with FlopCounterMode(display=False) as counter:
            run()
        for _ in range(3):
            run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            run()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / 5
        tflops = counter.get_total_flops() / ms / 1e9
        print(
            f"reference {name} {size}px batch {batch} {'fwd+bwd' if train else 'fwd'}: {ms:.1f} ms, {tflops:.0f} TFLOP/s"
        )


# aten calls that only make a new view of a tensor: no kernel launch
VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "reshape", "unsqueeze", "squeeze", "expand", "slice",
         "select", "alias", "as_strided", "detach", "unflatten", "split", "chunk", "unbind", "flatten", "lift_fresh"}  # fmt: skip


# aten calls that make the host wait for the GPU: reading a value (`.item()`, `if tensor`), sizing an output
# by the data (nonzero, boolean-mask indexing), and a tensor made from Python data (a blocking copy to a GPU)
SYNCS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "lift_fresh"}


class CountOps(TorchDispatchMode):
    """Counts the aten calls dispatched while active, by name, and apart the ones that synchronise the host
    with the GPU (SYNCS, and indexing with a boolean mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.calls[name] += 1
        if name in SYNCS or (name == "index" and any(getattr(i, "dtype", None) == torch.bool for i in args[1])):
            self.syncs[name] += 1
        return func(*args, **(kwargs or {}))


@dataclass
class BareStep:
    """The modules of one bare training step of a recipe (no Accelerate, logging or checkpointing), run
    phase by phase: each teacher's forward, the student's forward, the losses, backward, the optimiser.
    benchmarks/profile_gpu.py times and counts it; benchmarks/step_traffic.py runs it on fake tensors."""

    recipe: Recipe
    teachers: dict
    tasks: dict
    student: torch.nn.Module
    loss_fn: torch.nn.Module
    batch: dict
    normalizers: torch.nn.Module | None = None  # loss.normalize's TargetNormalizers, when the recipe sets it
    opt: torch.optim.Optimizer | None = None
    step: int = 0

    @classmethod
    def build(cls, recipe: Recipe, dev: torch.device) -> BareStep:
        torch.manual_seed(0)
        teachers = build_teachers(recipe, dev)
        tasks = build_tasks(recipe)
        student = build_student(recipe, teachers, tasks).train().to(dev)
        prepare_student(student, recipe.precision)
        batch = next(iter(build_loader(recipe, recipe.data.split, train=True)))
        batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        normalizers = build_target_normalizers(recipe, teachers)
        if normalizers is not None:
            normalizers.to(dev)
        return cls(recipe, teachers, tasks, student, build_distill_loss(recipe), batch, normalizers)

    def run(self, phase: Callable[[str, Callable[[], object]], object]) -> None:
        """One step; `phase(name, fn)` runs each phase's work `fn` and returns its result."""
        r, images = self.recipe, self.batch["image"]
        begin_step(r.precision.cuda_graphs)  # as the trainer marks each step (precision.compile_mode)
        if self.opt is None:
            self.opt = build_optimizer(r, self.student)
        dtype = teacher_dtype(r)
        targets = {
            tid: phase(f"teacher {tid}", lambda t=t: t.encode(images, dtype)) for tid, t in self.teachers.items()
        }
        if self.normalizers is not None:  # as the trainer: the batch joins the statistics, then the map applies

            def normalize(norm=self.normalizers, step=self.step):
                norm.update(targets, step)
                return norm(targets)

            targets = phase("normalize targets", normalize)
        mixed = r.precision.mixed in ("bf16", "fp16")
        autocast = torch.bfloat16 if r.precision.mixed == "bf16" else torch.float16

        def student_forward():
            with torch.autocast(images.device.type, dtype=autocast, enabled=mixed):
                return self.student(images)

        def optimiser():
            if r.optim.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.student.parameters(), r.optim.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

        out = phase("student forward", student_forward)
        alpha = r.loss.alpha if self.tasks else 1.0
        losses = phase("losses", lambda: compute_losses(out, targets, self.batch, self.tasks, self.loss_fn, alpha))
        phase("backward", losses.total.backward)
        phase("optimiser", optimiser)
        self.step += 1


def in_repo(path: str) -> Path:
    """A recipe path as given if it exists from here, else from the repository's root (the default recipes, for a
    run from another folder)."""
    return Path(path) if Path(path).exists() else Path(__file__).resolve().parents[1] / path


def profile_recipe(path: str, steps: int, overrides: list[str], sort: str, rows: int, dev: torch.device) -> dict:
    cuda = dev.type == "cuda"
    path = in_repo(path)
    recipe = load_recipe(path, overrides)
    if recipe.data.name == "synthetic":  # generate only the images the steps use
        recipe = load_recipe(path, ["data.options.length=64", *overrides])
    bare = BareStep.build(recipe, dev)

    def step(times: dict | None, counts: dict | None = None):
        """One training step; per phase, GPU ms (CUDA events), host ms and, if asked, the aten calls."""
        events, hosts, marks = [], [time.perf_counter()], []
        if cuda:
            events.append(torch.cuda.Event(enable_timing=True))
            events[0].record()
        counting = CountOps() if counts is not None else contextlib.nullcontext()

        def phase(name):  # ends the phase that ran since the previous mark
            hosts.append(time.perf_counter())
            if cuda:
                events.append(torch.cuda.Event(enable_timing=True))
                events[-1].record()
            marks.append(name)
            if counts is not None:
                counts[name] = (counting.calls.copy(), counting.syncs.copy())
                counting.calls.clear()
                counting.syncs.clear()

        def run_then_mark(name, fn):
            result = fn()
            phase(name)
            return result

        with counting:
            bare.run(run_then_mark)
        if cuda:
            torch.cuda.synchronize()
        if times is not None:
            for i, name in enumerate(marks):
                host = (hosts[i + 1] - hosts[i]) * 1e3
                gpu = events[i].elapsed_time(events[i + 1]) if cuda else float("nan")
                times.setdefault(name, []).append((gpu, host))

    for _ in range(3):
        step(None)
    times: dict[str, list[tuple[float, float]]] = {}
    wall = []
    for _ in range(steps):
        start = time.perf_counter()
        step(times)
        wall.append((time.perf_counter() - start) * 1e3)
    counts: dict[str, collections.Counter] = {}
    p = recipe.precision
    if not (p.compile_student or p.compile_teachers or p.compile_losses):  # compiled code: not op by op
        step(None, counts)

    def median(values):
        return sorted(values)[len(values) // 2]

    print(f"\n== {path} batch {recipe.data.batch_size} image {recipe.data.image_size} on {dev.type}: "
          f"{median(wall):.1f} ms/step (wall clock, synchronised)")  # fmt: skip
    print(f"  {'phase':24s} {'GPU ms':>8s} {'host ms':>8s} {'aten calls':>11s} {'non-view':>9s} {'syncs':>6s}")
    result = {"recipe": path, "overrides": overrides, "batch": recipe.data.batch_size, "step_ms": median(wall)}
    result["phases"] = []
    for name, v in times.items():
        gpu, host = median([g for g, _ in v]), median([h for _, h in v])
        calls, syncs = counts.get(name, (collections.Counter(), collections.Counter()))
        launches = sum(n for op, n in calls.items() if op not in VIEWS)
        print(f"  {name:24s} {gpu:8.1f} {host:8.1f} {sum(calls.values()):11d} {launches:9d} {sum(syncs.values()):6d}")
        row = {"phase": name, "host_ms": host, "aten_calls": sum(calls.values()), "non_view_calls": launches}
        row["host_syncs"] = dict(syncs)
        result["phases"].append(row | ({"gpu_ms": gpu} if cuda else {}))
    total = collections.Counter()
    for calls, _ in counts.values():
        total.update(calls)
    if total:
        print("  most frequent aten calls in one step:", ", ".join(f"{op} {n}" for op, n in total.most_common(12)))
    result["most_frequent"] = dict(total.most_common(12))
    if not cuda:
        return result
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step(None)
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=90))
    return result


if __name__ == "__main__":
    sys.exit(main())
