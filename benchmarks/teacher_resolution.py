"""What running a teacher below its native resolution costs in feature quality.

    python -m benchmarks.teacher_resolution [--scales 1.0 0.75 0.5]

For each offline pretrained teacher, on the held-out photographs of the demo data (fixed crops), the
features at a reduced input size are upsampled bilinearly to the native-size grid and compared with
the native-size features: mean per-image cosine of the flattened maps per level, and the time per
image (median of `--repeats` calls after one warm-up, the teacher prepared as training prepares it:
channels-last for the convolutional ones). A size is the multiple of the teacher's stride nearest to
scale x native (halves up); the table gives the ratio it really is. Writes
benchmarks/results/teacher_resolution.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sak.config import PrecisionConfig
from sak.data import DatasetSpec, build_dataset
from sak.engine.build import prepare_teacher
from sak.losses.distill import map_cosine
from sak.teachers import TeacherSpec, create_teacher

RESULTS = Path(__file__).resolve().parent / "results"
TEACHERS = {"dinov2_imgfocus": 224, "efficientnet_lite0": 224, "hed": 320}  # name: native input size


def features(name: str, size: int, images: torch.Tensor, repeats: int) -> tuple[list[torch.Tensor], float]:
    """The teacher's levels at input `size`, and the median seconds per image of `repeats` warm calls."""
    teacher = prepare_teacher(create_teacher(name, spec=TeacherSpec(image_size=size)), PrecisionConfig())
    levels = teacher.encode(images).levels  # (the warm-up call)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        teacher.encode(images)
        times.append(time.perf_counter() - start)
    return list(levels), statistics.median(times) / images.shape[0] if times else float("nan")


def reduced_size(native: int, scale: float, stride: int) -> int:
    return stride * max(1, math.floor(native * scale / stride + 0.5))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.75, 0.5])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder the JSON and markdown go to")
    args = parser.parse_args(argv)
    data = build_dataset(
        "package_images", DatasetSpec(split="val", image_size=448, train=False), {"crops_per_image": 8}
    )
    images = torch.stack([data[i]["image"] for i in range(args.images)])
    rows = []
    for name, native in TEACHERS.items():
        reference, _ = features(name, native, images, 0 if 1.0 in args.scales else 1)
        for scale in args.scales:
            size = reduced_size(native, scale, 14 if name == "dinov2_imgfocus" else 32)
            levels, per_image = features(name, size, images, args.repeats)
            cos = [map_cosine(F.interpolate(lv, size=ref.shape[-2:], mode="bilinear"), ref).mean().item()
                   for lv, ref in zip(levels, reference, strict=True)]  # fmt: skip
            rows.append({"teacher": name, "size": size, "native": native, "cosine_per_level": cos,
                         "seconds_per_image": per_image})  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "teacher_resolution.json").write_text(json.dumps(rows, indent=2))
    lines = [
        f"# Teacher features below the native resolution (CPU, {torch.get_num_threads()} threads)",
        "",
        f"Command: `python -m benchmarks.teacher_resolution {' '.join(argv or sys.argv[1:])}`; {args.images} held-out",
        "crops; cosine to the native-size features after bilinear upsampling, per level (shallow to deep).",
        "",
        f"Seconds per image: median of {args.repeats} calls after a warm-up, teachers prepared as in training.",
        "",
        "| teacher | input size | of native | cosine per level | seconds / image | less time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    native_time = {r["teacher"]: r["seconds_per_image"] for r in rows if r["size"] == r["native"]}
    for r in rows:
        cos = ", ".join(f"{c:.3f}" for c in r["cosine_per_level"])
        base = native_time.get(r["teacher"])
        faster = f"{base / r['seconds_per_image']:.2f}x" if base else "-"
        lines.append(f"| {r['teacher']} | {r['size']} (native {r['native']}) | {r['size'] / r['native']:.2f} | {cos} "
                     f"| {r['seconds_per_image']:.4f} | {faster} |")  # fmt: skip
    md = "\n".join(lines) + "\n"
    (args.results / "teacher_resolution.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
