"""The distillation loss's own cost: bilinear resize and cosine, PyTorch's ops against sak's rewrites.

    python -m benchmarks.distill_loss              # CPU (or the CUDA GPU if there is one)
    python -m benchmarks.distill_loss --device cpu

Every student map is upsampled to its teacher's grid (SAM's 64 x 64 in SAK) and the loss is taken there,
forward and backward, on every step. Timed forward + backward, median of the repeats after warm-up, at two
shapes: the CPU demo's (batch 8, 128 channels, 8 x 8 -> 56 x 56) and SAK's ViT-B stage 1 on a GPU (batch
16, 768 channels, 24 x 24 -> 64 x 64). The rewrites compute the same function (sak/losses/resize.py,
sak/losses/distill.py) with float32 sums in another order: for each pair both float32 versions are compared
with PyTorch's formulation run in float64 (outputs and gradients, relative to their largest magnitude).
On the CPU both run with the allocator settings CPU training uses (sak/engine/malloc.py).
A second table finds where taking the cosine of an upsampled student map at the student's size
(upsampled_cosine) starts to pay in the SAK loss: teacher grids from 1.3x to 7x the student's pixels.
Writes results/distill_loss_<device>.{json,md}.
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
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from sak.engine.malloc import keep_freed_memory
from sak.losses.distill import UPSAMPLED_COSINE_MIN_RATIO, SAKDistill, flat_cosine, match_size
from sak.losses.resize import resize_bilinear

from .step_traffic import CACHES, CountTraffic

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # name: (student map (B, C, h, w), teacher grid (H, W))
    "cpu-demo": ((8, 128, 8, 8), (56, 56)),
    "sak-vitb": ((16, 768, 24, 24), (64, 64)),
}


def reference_level_loss(student, teacher, loss: SAKDistill):
    """SAK's level loss as first written: F.interpolate, then F.cosine_similarity + smooth L1."""
    student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    cos = F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)
    l1 = F.smooth_l1_loss(student, teacher, beta=loss.beta)
    return loss.cos_weight * (1 - cos).mean() + loss.l1_weight * l1


def pairs(size):
    """name: (PyTorch's op, sak's rewrite), each mapping (student, teacher) to a tensor."""
    sak_loss = SAKDistill()
    return {
        "resize": (
            lambda s, t: F.interpolate(s, size=size, mode="bilinear", align_corners=False),
            lambda s, t: resize_bilinear(s, size),
        ),
        "cosine (at the teacher's size)": (
            lambda s, t: F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1),
            lambda s, t: flat_cosine(s, t),
        ),
        "SAK level loss (resize + cosine + smooth L1)": (
            lambda s, t: reference_level_loss(s, t, sak_loss),
            lambda s, t: sak_loss.pair_loss(s, t),
        ),
    }


def relative_diff(reference, other) -> float:
    """Largest absolute difference over the reference's largest magnitude."""
    return ((reference - other).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(fn, student, teacher, grad, repeats: int, warmup: int) -> float:
    times = []
    for i in range(warmup + repeats):
        x = student.detach().requires_grad_(True)
        sync(student.device)
        start = time.perf_counter()
        fn(x, teacher).backward(grad)
        sync(student.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(device: torch.device, repeats: int, warmup: int) -> list[dict]:
    rows = []
    for shape_name, (shape, size) in SHAPES.items():
        torch.manual_seed(0)
        student = torch.randn(shape, device=device)
        teacher = torch.randn(*shape[:2], *size, device=device)
        for op, (reference, rewrite) in pairs(size).items():
            # the cosine pair takes maps already at the teacher's size
            s = F.interpolate(student, size=size, mode="bilinear") if op.startswith("cosine") else student
            outs, grads, g = [], [], None  # PyTorch's formulation in float64 (the truth), then both in float32
            for fn, dtype in ((reference, torch.float64), (reference, torch.float32), (rewrite, torch.float32)):
                x = s.detach().to(dtype, copy=True).requires_grad_(True)
                out = fn(x, teacher.to(dtype))
                if g is None:  # a random upstream gradient, the same for all three: all ones made a linear
                    # resize's gradient the sums of its interpolation weights, which every formulation gets exact
                    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
                    g = g.to(device)
                out.backward(g.to(dtype))
                outs.append(out.detach().double())
                grads.append(x.grad.double())
            g = g.float()
            rows.append(
                {
                    "shape": shape_name,
                    "student": list(s.shape),
                    "teacher": list(teacher.shape),
                    "op": op,
                    "pytorch_s": time_fwd_bwd(reference, s, teacher, g, repeats, warmup),
                    "sak_s": time_fwd_bwd(rewrite, s, teacher, g, repeats, warmup),
                    "pytorch_error_output": relative_diff(outs[0], outs[1]),
                    "pytorch_error_grad": relative_diff(grads[0], grads[1]),
                    "sak_error_output": relative_diff(outs[0], outs[2]),
                    "sak_error_grad": relative_diff(grads[0], grads[2]),
                }
            )
            r = rows[-1]
            print(f"{shape_name} {op}: {r['pytorch_s'] * 1e3:.1f} -> {r['sak_s'] * 1e3:.1f} ms", flush=True)
    return rows


# the ViT-B student's 24 x 24 map upsampled to teacher grids from DINOv2's 27 x 27 to SAM's 64 x 64
CROSSOVER = [((16, 768, 24, 24), (n, n)) for n in (27, 36, 48, 64)]


def counted_gbytes(fn, student_shape, teacher_shape) -> float:
    """GB that fn's forward + backward reads and writes, counted on fake tensors as benchmarks/step_traffic.py
    counts a training step."""
    for cached in CACHES:  # cached constants: made fake in this mode, only for it
        cached.cache_clear()
    with FakeTensorMode():
        student = torch.randn(student_shape, requires_grad=True)
        teacher = torch.randn(teacher_shape)
        fn(student, teacher)  # the cached interpolation matrices are made outside the count
        with CountTraffic() as counter:
            fn(student, teacher).backward()
    for cached in CACHES:
        cached.cache_clear()
    return sum(moved for _, moved, _ in counter.rows.values()) / 1e9


def crossover(device: torch.device, repeats: int, warmup: int) -> list[dict]:
    """The SAK level loss of an upsampled student map two ways: the cosine taken at the teacher's size
    (level_loss after resize_bilinear) or at the student's (upsampled_loss, with upsampled_cosine), by how many
    times more pixels the teacher's grid has. The loss takes the second from UPSAMPLED_COSINE_MIN_RATIO on."""
    loss = SAKDistill()
    ways = (("full_size", lambda s, t: loss.level_loss(*match_size(s, t))), ("upsampled_cosine", loss.upsampled_loss))
    rows = []
    for shape, size in CROSSOVER:
        teacher_shape = (*shape[:2], *size)
        row = {
            "student": list(shape),
            "teacher": list(teacher_shape),
            "ratio": size[0] * size[1] / (shape[2] * shape[3]),
        }
        for name, fn in ways:
            row[f"{name}_gbytes"] = counted_gbytes(fn, shape, teacher_shape)
        torch.manual_seed(0)
        student, teacher = torch.randn(shape, device=device), torch.randn(teacher_shape, device=device)
        grad = torch.ones((), device=device)
        for name, fn in ways:
            row[f"{name}_s"] = time_fwd_bwd(fn, student, teacher, grad, repeats, warmup)
        rows.append(row)
        print(
            f"crossover {size}: {row['full_size_s'] * 1e3:.1f} -> {row['upsampled_cosine_s'] * 1e3:.1f} ms", flush=True
        )
    return rows


def table(rows: list[dict], device: str, command: str) -> str:
    lines = [
        f"# Distillation loss: PyTorch ops against sak's rewrites ({device}, torch {torch.__version__})",
        "",
        f"Command: `{command}`. Forward + backward, float32, median of the repeats after warm-up. Error: the",
        "largest absolute difference from PyTorch's formulation run in float64, of the outputs and of the gradients",
        "with respect to the student map, over the largest magnitude of the float64 ones.",
        "",
        "| shapes | op | student | teacher | PyTorch (ms) | sak (ms) | speed-up | error out / grad: PyTorch | sak |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['op']} | {tuple(r['student'])} | {tuple(r['teacher'])} "
            f"| {r['pytorch_s'] * 1e3:.1f} | {r['sak_s'] * 1e3:.1f} | {r['pytorch_s'] / r['sak_s']:.2f}x "
            f"| {r['pytorch_error_output']:.1e} / {r['pytorch_error_grad']:.1e} "
            f"| {r['sak_error_output']:.1e} / {r['sak_error_grad']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def crossover_table(rows: list[dict]) -> str:
    lines = [
        "## The SAK level loss of an upsampled student map: the cosine at the teacher's size or at the student's",
        "",
        "Forward + backward, float32, of `SAKDistill.level_loss` on the upsampled map (full size) against",
        "`SAKDistill.upsampled_loss` (sak/losses/distill.py), whose cosine never forms the upsampled map; GB read and",
        "written as benchmarks/step_traffic.py counts them (what a GPU moves at least). The SAK loss takes",
        f"upsampled_loss where the teacher's grid has at least {UPSAMPLED_COSINE_MIN_RATIO}x the student's pixels.",
        "",
        "| student | teacher | pixels | full size (ms) | upsampled_cosine (ms) | full size (GB) | upsampled_cosine (GB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {tuple(r['student'])} | {tuple(r['teacher'])} | {r['ratio']:.2f}x | {r['full_size_s'] * 1e3:.1f} "
            f"| {r['upsampled_cosine_s'] * 1e3:.1f} | {r['full_size_gbytes']:.2f} | {r['upsampled_cosine_gbytes']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--results", default=str(RESULTS), help="folder for distill_loss_<device>.{json,md}")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # as CPU training runs (sak/engine/malloc.py); otherwise page faults add noise
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    rows = measure(device, args.repeats, args.warmup)
    cross = crossover(device, args.repeats, args.warmup)
    command = "python -m benchmarks.distill_loss " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": name, "machine": platform.machine(), "torch": torch.__version__}
    (out / f"distill_loss_{device.type}.json").write_text(
        json.dumps(meta | {"results": rows, "crossover": cross}, indent=2)
    )
    (out / f"distill_loss_{device.type}.md").write_text(table(rows, name, command) + "\n" + crossover_table(cross))
    print((out / f"distill_loss_{device.type}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
