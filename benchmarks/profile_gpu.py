"""Where a GPU training step spends its time: per-phase CUDA-event timings and the top kernels.

    python -m benchmarks.profile_gpu [--recipe recipes/bench/stage2_gpu_vitb.yaml] [--steps 5]

Phases of the bare step (the same modules the engine runs): each teacher's forward, the student's
forward, the losses, backward, optimiser step; then the 20 most expensive CUDA kernels of one step.
"""

from __future__ import annotations

import argparse
import sys

import torch

from sak.config import load_recipe
from sak.engine.build import (
    build_distill_loss,
    build_loader,
    build_optimizer,
    build_student,
    build_tasks,
    build_teachers,
)
from sak.engine.step import compute_losses
from sak.engine.trainer import teacher_dtype


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", action="append")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sort", default="cuda_time_total", help="key_averages column, e.g. self_cuda_time_total")
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--reference", action="store_true", help="also time bare timm models (what the GPU can do)")
    args = parser.parse_args(argv)
    if args.reference:
        reference()
    for path in args.recipe or ["recipes/bench/stage1_gpu_vitb.yaml", "recipes/bench/stage2_gpu_vitb.yaml"]:
        profile_recipe(path, args.steps, args.overrides, args.sort, args.rows)
        torch.cuda.empty_cache()
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


def profile_recipe(path: str, steps: int, overrides: list[str], sort: str, rows: int) -> None:
    dev = torch.device("cuda")
    recipe = load_recipe(path, ["data.options.length=64", *overrides])
    torch.manual_seed(0)
    teachers = build_teachers(recipe, dev)
    tasks = build_tasks(recipe)
    student = build_student(recipe, teachers, tasks).train().to(dev)
    opt = build_optimizer(recipe, student)
    loss_fn = build_distill_loss(recipe)
    batch = next(iter(build_loader(recipe, recipe.data.split, train=True)))
    batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    dtype = teacher_dtype(recipe)
    alpha = recipe.loss.alpha if tasks else 1.0
    bf16 = recipe.precision.mixed == "bf16"

    def step(times: dict | None):
        ev = [torch.cuda.Event(enable_timing=True)]
        ev[0].record()
        marks = []

        def mark(name):
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            ev.append(e)
            marks.append(name)

        targets = {}
        for tid, t in teachers.items():
            targets[tid] = t.encode(batch["image"], dtype)
            mark(f"teacher {tid}")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = student(batch["image"])
        mark("student forward")
        losses = compute_losses(out, targets, batch, tasks, loss_fn, alpha)
        mark("losses")
        losses.total.backward()
        mark("backward")
        if recipe.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(student.parameters(), recipe.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimiser")
        torch.cuda.synchronize()
        if times is not None:
            for name, a, b in zip(marks, ev[:-1], ev[1:], strict=True):
                times.setdefault(name, []).append(a.elapsed_time(b))

    for _ in range(3):
        step(None)
    times: dict[str, list[float]] = {}
    for _ in range(steps):
        step(times)
    total = sum(sorted(v)[len(v) // 2] for v in times.values())
    print(f"\n== {path} batch {recipe.data.batch_size} image {recipe.data.image_size}: {total:.1f} ms/step")
    for name, v in times.items():
        med = sorted(v)[len(v) // 2]
        print(f"  {name:24s} {med:8.1f} ms  {med / total:5.1%}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step(None)
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=90))


if __name__ == "__main__":
    sys.exit(main())
