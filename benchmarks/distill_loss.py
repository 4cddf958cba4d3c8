"""The distillation loss's own cost: bilinear resize and cosine, PyTorch's ops against sak's rewrites.

    python -m benchmarks.distill_loss              # CPU (or the CUDA GPU if there is one)
    python -m benchmarks.distill_loss --device cpu

Every student map is upsampled to its teacher's grid before the loss (SAM's 64 x 64 in SAK) and the
gradient flows back through the resize and the cosine, so both run forward and backward at the teacher's
full size on every step. Timed forward + backward, median of the repeats after warm-up, at two shapes:
the CPU demo's (batch 8, 128 channels, 8 x 8 -> 56 x 56) and SAK's ViT-B stage 1 on a GPU (batch 16,
768 channels, 24 x 24 -> 64 x 64). For each pair the largest difference of outputs and input gradients is
reported too (relative to its largest magnitude): the rewrites compute the same function (sak/losses/resize.py, sak/losses/distill.py).
On the CPU both run with the allocator settings CPU training uses (sak/engine/malloc.py).
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

from sak.engine.malloc import keep_freed_memory
from sak.losses.distill import SAKDistill, flat_cosine, match_size
from sak.losses.resize import resize_bilinear

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
            lambda s, t: sak_loss.level_loss(*match_size(s, t)),
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
            outs, grads = [], []
            for fn in (reference, rewrite):
                x = s.detach().requires_grad_(True)
                out = fn(x, teacher)
                g = torch.ones_like(out) if out.dim() else torch.ones((), device=device)
                out.backward(g)
                outs.append(out.detach())
                grads.append(x.grad)
            rows.append(
                {
                    "shape": shape_name,
                    "student": list(s.shape),
                    "teacher": list(teacher.shape),
                    "op": op,
                    "pytorch_s": time_fwd_bwd(reference, s, teacher, g, repeats, warmup),
                    "sak_s": time_fwd_bwd(rewrite, s, teacher, g, repeats, warmup),
                    "max_rel_diff_output": relative_diff(outs[0], outs[1]),
                    "max_rel_diff_grad": relative_diff(grads[0], grads[1]),
                }
            )
            r = rows[-1]
            print(f"{shape_name} {op}: {r['pytorch_s'] * 1e3:.1f} -> {r['sak_s'] * 1e3:.1f} ms", flush=True)
    return rows


def table(rows: list[dict], device: str, command: str) -> str:
    lines = [
        f"# Distillation loss: PyTorch ops against sak's rewrites ({device}, torch {torch.__version__})",
        "",
        f"Command: `{command}`. Forward + backward, float32, median of the repeats after warm-up. Relative diff:",
        "the largest absolute difference of the outputs, and of the gradients with respect to the student map,",
        "over the largest magnitude of PyTorch's.",
        "",
        "| shapes | op | student | teacher | PyTorch (ms) | sak (ms) | speed-up | relative diff out / grad |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['op']} | {tuple(r['student'])} | {tuple(r['teacher'])} "
            f"| {r['pytorch_s'] * 1e3:.1f} | {r['sak_s'] * 1e3:.1f} | {r['pytorch_s'] / r['sak_s']:.2f}x "
            f"| {r['max_rel_diff_output']:.1e} / {r['max_rel_diff_grad']:.1e} |"
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
    command = "python -m benchmarks.distill_loss " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": name, "machine": platform.machine(), "torch": torch.__version__}
    (out / f"distill_loss_{device.type}.json").write_text(json.dumps(meta | {"results": rows}, indent=2))
    (out / f"distill_loss_{device.type}.md").write_text(table(rows, name, command))
    print((out / f"distill_loss_{device.type}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
