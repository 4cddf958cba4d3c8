"""What running a teacher in low precision changes: bf16 autocast against weights cast to bf16 once.

    python -m benchmarks.teacher_precision [--images 8] [--repeats 3]

For each offline pretrained teacher at its native input size, on held-out crops of the demo photographs:
the features in float32, under bf16 autocast (`precision.teachers: bf16`, float32 weights), and with the
weights cast to bf16 (`precision.teacher_weights: cast`: LayerNorm, softmax and the residual stream in
bf16 too); mean per-image cosine of the flattened maps to the float32 ones per level, and the time per
image (median of the repeats after one warm-up pass). On a CUDA GPU fp16 is measured as well.
Writes benchmarks/results/teacher_precision_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sak.config import PrecisionConfig
from sak.data import DatasetSpec, build_dataset
from sak.engine.build import prepare_teacher
from sak.losses.distill import map_cosine
from sak.teachers import TeacherSpec, create_teacher

RESULTS = Path(__file__).resolve().parent / "results"
SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16"}  # recipe names of the low precisions
TEACHERS = {"dinov2_imgfocus": 224, "efficientnet_lite0": 224, "hed": 320}  # name: native input size


def timed(teacher, images: torch.Tensor, dtype, repeats: int) -> tuple[list[torch.Tensor], float]:
    levels = teacher.encode(images, dtype).levels  # warm-up (and the features)
    times = []
    for _ in range(repeats):
        if images.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        teacher.encode(images, dtype)
        if images.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return list(levels), statistics.median(times) / images.shape[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder the JSON and markdown go to")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = build_dataset(
        "package_images", DatasetSpec(split="val", image_size=448, train=False), {"crops_per_image": 8}
    )
    images = torch.stack([data[i]["image"] for i in range(args.images)]).to(device)
    low = [torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    rows = []
    for name, native in TEACHERS.items():
        # prepared as build_teachers prepares them (channels-last for convolutional teachers)
        teacher = prepare_teacher(
            create_teacher(name, spec=TeacherSpec(image_size=native)).to(device), PrecisionConfig()
        )
        reference, fp32_time = timed(teacher, images, None, args.repeats)
        rows.append({"teacher": name, "size": native, "mode": "float32", "cosine_per_level": [1.0] * len(reference),
                     "seconds_per_image": fp32_time})  # fmt: skip
        for dtype in low:
            autocast, t_auto = timed(teacher, images, dtype, args.repeats)
            cast = create_teacher(name, spec=TeacherSpec(image_size=native)).to(device)
            prepare_teacher(cast, PrecisionConfig(teachers=SHORT[dtype], teacher_weights="cast"))
            cast_levels, t_cast = timed(cast, images, dtype, args.repeats)
            short = str(dtype).removeprefix("torch.")
            for mode, levels, seconds in (
                (f"{short} autocast", autocast, t_auto),
                (f"{short} cast", cast_levels, t_cast),
            ):
                cos = [map_cosine(a, r).mean().item() for a, r in zip(levels, reference, strict=True)]
                rows.append({"teacher": name, "size": native, "mode": mode, "cosine_per_level": cos,
                             "seconds_per_image": seconds})  # fmt: skip
            del cast
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    args.results.mkdir(parents=True, exist_ok=True)
    meta = {"device": where, "torch": torch.__version__, "images": args.images}
    (args.results / f"teacher_precision_{device.type}.json").write_text(json.dumps(meta | {"results": rows}, indent=2))
    lines = [
        f"# Teachers in low precision ({where}, torch {torch.__version__})",
        "",
        f"Command: `python -m benchmarks.teacher_precision {' '.join(argv if argv is not None else sys.argv[1:])}`;",
        f"{args.images} held-out crops at each teacher's native size. 1 - cosine of each level (shallow to deep) to",
        "the float32 features (mean per-image cosine of the flattened maps); time per image, median of the repeats. `autocast`: float32 weights under autocast",
        "(`precision.teachers`); `cast`: weights cast once (`precision.teacher_weights: cast`).",
        "",
        "| teacher | mode | 1 - cosine to float32, per level | seconds / image |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        cos = ", ".join(f"{1 - c:.1e}" for c in r["cosine_per_level"])
        lines.append(f"| {r['teacher']} ({r['size']} px) | {r['mode']} | {cos} | {r['seconds_per_image']:.4f} |")
    md = "\n".join(lines) + "\n"
    (args.results / f"teacher_precision_{device.type}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
