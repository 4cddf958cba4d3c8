"""How fast `sak cache build` turns image files into a cache, with the images read in the build's own
process (`data.num_workers: 0`) or by loader workers while the teachers run.

    python -m benchmarks.cache_build                 # writes results/cache_build_cpu.{json,md}
    python -m benchmarks.cache_build --images 96 --workers 0 2

The data is a folder of JPEG files (640 x 480, quality 90, the size of a PASCAL / NYUD photograph) cut from
the demo's photographs, read as `image_folder` with the training augmentation (`--augment`: decode, random
resized crop, flip). Two teacher sets: the demo recipe's three pretrained teachers, and one small random
ViT whose cost is near the reading's, where overlapping the two matters most (`--teachers demo small`, the
default); on a GPU machine `--teachers gpu small`, the GPU recipes' three base teachers with random weights
at their resolutions in bf16 (the demo teachers' packages are not there). Each build runs in a fresh
directory after one untimed build (warm page cache and imports); the time covers `build_cache` from its
start to the manifest (teachers built, images read, teachers run, shards written and hashed). `read only`
is the same loader with no teacher behind it. Last, what the build reads of one PASCAL-Context training
sample with all five tasks (the fixture's files at 375 x 500, the size of a VOC photograph): the whole
sample, as training reads it, against `image_at`, the image and the semseg labels that choose its crop.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sak.config import load_recipe
from sak.data import DatasetSpec, build_dataset
from sak.data.fixtures import write_pascal_context
from sak.data.package_images import TRAIN_IMAGES, load_package_image
from sak.engine.cache import CachePlan, build_cache, training_dataset
from sak.engine.cache.builder import _view_loader

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEMO = ROOT / "recipes" / "demo" / "default.yaml"
SMALL = ["teachers=[{name: timm, key: vit, options: {model: vit_small_patch16_224, "
         "model_kwargs: {embed_dim: 96, depth: 4, num_heads: 3, img_size: 112}}}]"]  # fmt: skip
# the GPU recipes' three base teachers (random weights, timm) at their resolutions, in bf16: for a GPU machine,
# which has neither the demo teachers' packages nor a reason to time them
GPU = [
    "teachers=[{name: dinov2, key: dinov2, image_size: 378, options: {size: base, source: timm}}, "
    "{name: clip, key: clip, image_size: 384, options: {source: timm, model: vit_base_patch16_clip_384}}, "
    "{name: sam, key: sam, options: {source: timm, size: b}}]",
    "data.image_size=384",
    "precision.mixed=bf16",
]
TEACHER_SETS = {"demo (dinov2, effnet, hed)": [], "one small ViT": SMALL, "GPU recipe (dinov2, clip, sam)": GPU}
CHOICES = {"demo": "demo (dinov2, effnet, hed)", "small": "one small ViT", "gpu": "GPU recipe (dinov2, clip, sam)"}


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    """`count` 640 x 480 JPEG crops of the demo's training photographs (upscaled where smaller)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    photos = [Image.fromarray(load_package_image(name)) for name in TRAIN_IMAGES]
    for i in range(count):
        photo = photos[i % len(photos)]
        scale = max(640 / photo.width, 480 / photo.height, 1.0)
        photo = photo.resize((round(photo.width * scale), round(photo.height * scale)))
        left, top = rng.integers(0, photo.width - 640 + 1), rng.integers(0, photo.height - 480 + 1)
        photo.crop((left, top, left + 640, top + 480)).save(folder / f"im{i:05d}.jpg", quality=90)


def recipe_for(data: Path, teachers: list[str], workers: int, out: str):
    return load_recipe(DEMO, [f"run.output_dir={out}", "data.name=image_folder", f"data.root={data}",
                              "data.options={}", f"data.num_workers={workers}", *teachers])  # fmt: skip


def read_only(recipe, images: int, batch: int) -> float:
    """Seconds to read and augment every image through the build's loader, with no teacher behind it."""
    dataset = training_dataset(recipe, augment=True)
    loader = _view_loader(dataset, [(0, 0)], CachePlan(Path("."), images, images, 1), batch, recipe.data.num_workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def pascal_reads(folder: Path, samples: int = 24) -> dict:
    """Milliseconds per PASCAL-Context training sample (all five tasks, 512 crops): `dataset[i]` / `image_at(i)`."""
    root = write_pascal_context(folder, n_train=samples, n_val=1, size=(375, 500))
    tasks = ("semseg", "parts", "saliency", "normals", "edges")
    dataset = build_dataset("pascal_context", DatasetSpec(root=str(root), image_size=512, tasks=tasks, train=True))
    out = {"samples": samples}
    for name, read in (("sample_ms", lambda i: dataset[i]), ("image_at_ms", dataset.image_at)):
        read(0)
        start = time.perf_counter()
        for i in range(samples):
            read(i)
        out[name] = 1000 * (time.perf_counter() - start) / samples
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--name", default="cache_build_cpu", help="results file stem")
    parser.add_argument(
        "--teachers",
        nargs="+",
        choices=list(CHOICES),
        default=["demo", "small"],
        help="teacher sets to time (gpu: the GPU recipes' three base teachers, random weights)",
    )
    args = parser.parse_args(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    meta = {"device": device, "machine": platform.machine(), "torch": torch.__version__, "images": args.images,
            "batch": args.batch}  # fmt: skip
    results, reads = [], None
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.cache_build " + " ".join(argv if argv is not None else sys.argv[1:])

    def write() -> None:  # after every row: a run cut short by a time limit keeps what it measured
        write_results(out, args, meta, command, results, reads)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_images(data / "train", args.images)
        for label in (CHOICES[c] for c in args.teachers):
            teachers = TEACHER_SETS[label]
            for workers in args.workers:
                recipe = recipe_for(data, teachers, workers, tmp)
                build = lambda name, r=recipe: build_cache(  # noqa: E731
                    r, Path(tmp) / name, augment=True, shard_size=64, batch_size=args.batch
                )
                shutil.rmtree(build(f"warm-{label}-{workers}"))  # (the GPU set's cache is 31.6 MiB an image)
                start = time.perf_counter()
                timed = build(f"timed-{label}-{workers}")
                seconds = time.perf_counter() - start
                shutil.rmtree(timed)
                row = {"teachers": label, "workers": workers, "build_s": seconds,
                       "images_per_s": args.images / seconds,
                       "read_only_s": read_only(recipe, args.images, args.batch)}  # fmt: skip
                print(json.dumps(row), flush=True)
                results.append(row)
                write()
        reads = pascal_reads(Path(tmp) / "PASCAL_MT")
    write()
    print((out / f"{args.name}.md").read_text())
    return 0


def write_results(out: Path, args, meta: dict, command: str, results: list[dict], reads: dict | None) -> None:
    (out / f"{args.name}.json").write_text(json.dumps(meta | {"results": results, "pascal_reads": reads}, indent=2))
    lines = [
        f"# Cache build throughput ({meta['device']}, torch {meta['torch']})",
        "",
        f"Command: `{command.strip()}`. {args.images} JPEG files of 640 x 480 read as `image_folder` with the training",
        f"augmentation (`--augment`), batches of {args.batch}, shards of 64; see the module docstring of",
        "benchmarks/cache_build.py. `workers` is the recipe's `data.num_workers`, which the build's loader uses.",
        "",
        "| teachers | workers | build (s) | images/s | read only (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['teachers']} | {r['workers']} | {r['build_s']:.2f} | {r['images_per_s']:.1f} "
              f"| {r['read_only_s']:.2f} |" for r in results]  # fmt: skip
    if reads is not None:
        lines += ["", f"One PASCAL-Context training sample with all five tasks (375 x 500 files, 512 crops, mean of "
                  f"{reads['samples']}): {reads['sample_ms']:.1f} ms read whole, {reads['image_at_ms']:.1f} ms "
                  "through `image_at` (the image and the semseg labels), which the build reads."]  # fmt: skip
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
