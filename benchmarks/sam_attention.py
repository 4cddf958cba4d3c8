"""SAM's relative-position attention three ways: written out (as segment_anything computes it), folded into
PyTorch's fused attention (`sak.teachers.sam_attention.rel_pos_attention`, the teacher's default), and through
FlexAttention (`rel_pos_flex_attention`, `attention: flex`); and, in the first table only, the folded
attention with v left 64 wide (`narrow_v`: no flash kernel then, a third fewer products in the global
blocks). The first table's `folded` pads v to q's width; the teacher's `folded` leaves it 64 wide on a CUDA
device (where the first table's H200 run found it faster) and pads it on the CPU, and so does the encoder's
`folded` row (results/sam_attention_cuda.md of 2026-11-27 predates this: its encoder `folded` row padded v).

    python -m benchmarks.sam_attention                                  # CPU: 512 px, batch 1
    python -m benchmarks.sam_attention --image-size 1024 --batch 16     # the GPU recipes' SAM-B (bf16)

Part 1 times the attention alone at the shapes of SAM-B's two kinds of block (12 heads of 64 channels): the
global blocks' (image / 16)^2 tokens and the windowed blocks' 14 x 14 windows (the token grid zero-padded to
a multiple of 14, as SAM pads it). Forward in inference mode, median of the repeats after warm-up, in bf16 on
a GPU and in float32 and bf16 on the CPU. TFLOP/s counts the attention as SAM defines it, 4 N^2 c per head
(<q, k> and the weighted sum of v; the bias and the softmax not counted), so a kernel that computes more
(the folded one's heads are c + H + W wide) shows a lower rate for the same work. Error: the largest
absolute difference from the written-out attention in float32 on the same (rounded) inputs, over its
largest magnitude.

Part 2 times the whole SAM-B image encoder (timm source, random weights, the relative-position tables drawn
from N(0, 0.1) where timm starts them at zero; speed does not depend on the weights)
with the teacher option `attention: library` (timm's masked attention, PyTorch's unfused math kernel),
`folded` and `flex`, per image, in the same precision; on a CUDA device also `folded, v padded`, the
teacher's folded attention with v zero-padded as on the CPU.

FlexAttention is compiled for each shape on its first call (on this CPU, some seconds per shape); the warm-up
calls pay it. Writes results/sam_attention_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from unittest import mock

import torch

from sak.teachers import TeacherSpec, create_teacher
from sak.teachers.sam_attention import KERNELS as KERNELS_BY_OPTION
from sak.teachers.sam_attention import fuse_sam_attention, rel_pos_attention, rel_pos_flex_attention

from .ways import header, median_time, write_results

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, CHANNELS, WINDOW, PATCH = 12, 64, 14, 16  # SAM-B
KERNELS = {
    "folded": partial(rel_pos_attention, narrow_v=False),
    "folded, v 64 wide": partial(rel_pos_attention, narrow_v=True),  # not the flash kernel: unequal widths
    "flex": rel_pos_flex_attention,
}


def written_out(q, k, v, rh, rw, size, scale):
    """SAM's attention as segment_anything writes it: the whole (N x N) logits, the bias added, softmax."""
    b, n_heads, n, c = q.shape
    h, w = size
    r_q = q.reshape(b, n_heads, h, w, c)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh.to(q.dtype))
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw.to(q.dtype))
    logits = (scale * q @ k.transpose(-2, -1)).view(b, n_heads, h, w, h, w)
    logits = logits + bias_h[..., :, None] + bias_w[..., None, :]
    return logits.view(b, n_heads, n, n).softmax(dim=-1) @ v


def block_shapes(image_size: int, batch: int) -> dict[str, tuple[int, int, int]]:
    """Block kind: (attention batch, grid h, grid w) of SAM-B at this input size."""
    grid = image_size // PATCH
    windows = (-(-grid // WINDOW)) ** 2  # the grid padded to whole windows
    return {"global": (batch, grid, grid), "windowed": (batch * windows, WINDOW, WINDOW)}


def attention_rows(args, device: torch.device, dtypes: list[torch.dtype]) -> list[dict]:
    rows = []
    scale = CHANNELS**-0.5
    for kind, (b, h, w) in block_shapes(args.image_size, args.batch).items():
        n = h * w
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, HEADS, n, CHANNELS, generator=gen, device=device) for _ in range(3))
        rh, rw = (0.1 * torch.randn(s, s, CHANNELS, generator=gen, device=device) for s in (h, w))
        flop = 4 * b * HEADS * n * n * CHANNELS
        for dtype in dtypes:
            inputs = [t.to(dtype) for t in (q, k, v, rh, rw)]
            with torch.inference_mode():
                truth = torch.cat(  # in float32, a few images at a time (at 1024 px a logit map is 0.8 GB each)
                    [
                        written_out(*[t[i : i + 4].float() for t in inputs[:3]], *inputs[3:], (h, w), scale)
                        for i in range(0, b, 4)
                    ]
                )
                fns = {"written out": written_out, **KERNELS}
                for name, fn in fns.items():
                    out = fn(*inputs, (h, w), scale)
                    error = ((out.float() - truth).abs().max() / truth.abs().max()).item()
                    seconds = median_time(partial(fn, *inputs, (h, w), scale), device, args.repeats, args.warmup)
                    rows.append(
                        {
                            "block": kind,
                            "shape": [b, HEADS, n, CHANNELS],
                            "grid": [h, w],
                            "dtype": str(dtype).removeprefix("torch."),
                            "kernel": name,
                            "seconds": seconds,
                            "tflops": flop / seconds / 1e12,
                            "error": error,
                        }
                    )
                    print(f"{kind} {rows[-1]['dtype']} {name}: {seconds * 1e3:.2f} ms, error {error:.1e}", flush=True)
    return rows


def encoder_rows(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    rows = []
    images = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    images = images.to(device)
    reference = None
    variants = ["library", "folded", "flex"]
    if device.type == "cuda":  # where the teacher's folded kernel leaves v narrow: the padded one beside it
        variants.insert(2, "folded, v padded")
    for variant in variants:
        attention = variant.split(",")[0]
        torch.manual_seed(0)
        teacher = create_teacher(
            "sam", spec=TeacherSpec(image_size=args.image_size), source="timm", size="b", attention=attention
        )
        if variant == "folded, v padded":
            with mock.patch.dict(KERNELS_BY_OPTION, {"padded": partial(rel_pos_attention, narrow_v=False)}):
                fuse_sam_attention(teacher, "padded")
        tables = torch.Generator().manual_seed(0)
        with torch.no_grad():  # timm initialises the relative-position tables to zero: give the bias some weight
            for name, param in teacher.named_parameters():
                if "rel_pos" in name:
                    param.normal_(0, 0.1, generator=tables)
        teacher.to(device)
        autocast = None if dtype == torch.float32 else dtype
        levels = teacher.encode(images, autocast).levels
        if reference is None:
            reference = levels
        error = max(
            ((a.float() - b.float()).norm() / a.float().norm()).item() for a, b in zip(reference, levels, strict=True)
        )
        seconds = median_time(partial(teacher.encode, images, autocast), device, args.repeats, args.warmup)
        rows.append(
            {
                "attention": variant,
                "dtype": str(dtype).removeprefix("torch."),
                "seconds_per_image": seconds / args.batch,
                "relative_difference_to_library": error,
            }
        )
        print(f"encoder {variant}: {seconds / args.batch * 1e3:.1f} ms per image", flush=True)
        del teacher
    return rows


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [
        f"# SAM's relative-position attention: written out, folded, FlexAttention ({result['device']}, "
        f"torch {result['torch']})",
        "",
        f"Command: `{result['command']}`. SAM-B (12 heads of 64) at {a['image_size']} px, batch {a['batch']}; "
        f"median of {a['repeats']} after {a['warmup']} (see the docstring of benchmarks/sam_attention.py). "
        "TFLOP/s: SAM's own attention FLOPs (4 N^2 c per head) over the time.",
        "",
        "## The attention alone",
        "",
        "| block | q, k, v | dtype | kernel | ms | TFLOP/s | error |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["attention"]:
        lines.append(
            f"| {r['block']} ({r['grid'][0]} x {r['grid'][1]}) | {tuple(r['shape'])} | {r['dtype']} | {r['kernel']} "
            f"| {r['seconds'] * 1e3:.2f} | {r['tflops']:.2f} | {r['error']:.1e} |"
        )
    lines += [
        "",
        "## The SAM-B image encoder",
        "",
        "| attention | dtype | ms per image | relative difference of the levels to `library` |",
        "| --- | --- | --- | --- |",
    ]
    for r in result["encoder"]:
        lines.append(
            f"| {r['attention']} | {r['dtype']} | {r['seconds_per_image'] * 1e3:.1f} "
            f"| {r['relative_difference_to_library']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-encoder", action="store_true", help="part 1 only")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32, torch.bfloat16]
    result = header("sam_attention", argv, args, device) | {
        "attention": attention_rows(args, device, dtypes),
        "encoder": [] if args.skip_encoder else encoder_rows(args, device, dtypes[0]),
    }
    write_results(args.results, f"sam_attention_{device.type}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
