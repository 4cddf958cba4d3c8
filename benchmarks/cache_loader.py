"""How fast the training loader delivers cached teacher maps, without a training step behind it.

    python -m benchmarks.cache_loader            # writes results/cache_loader_cpu.{json,md}
    python -m benchmarks.cache_loader --images 256 --workers 2 8 --results OUT

The GPU configuration's cache holds 31.6 MiB per image (fp16: DINOv2-B 4 x 768 x 27 x 27, CLIP-B
4 x 768 x 24 x 24, SAM-B 4 x 768 x 64 x 64), 505 MB per batch of 16. On the H100 the cached stage-1
step takes 0.064 s while training read only 128-199 images/s (benchmarks/results/throughput_gpu.md): the
loader or the copy to the GPU, not the step, set the pace. This measures the loader alone: the training's DataLoader
(`sak.engine.build.build_loader`, the synthetic dataset the GPU recipe trains on) with the cache attached
as the trainer attaches it, iterated for `--epochs` epochs; each epoch's rate is counted from the arrival
of the batch after those the workers had in flight when the first arrived (`num_workers` x the prefetch
factor, 2; the first's wait is the workers' start-up) to its last: the batches in flight may all be ready
by then, and counting them made the rate optimistic (about 15% with 2 workers and 8 batches an epoch, the
committed results before 2026-11-29). So an epoch needs at least two batches more than that. The
maps are read by the loader: on a GPU machine its workers send each batch's `CachedRows` and the
DataLoader's pin-memory thread reads the maps into page-locked memory; elsewhere the workers read them
(with `--workers 0`, the loader's own next()). On a GPU machine the last epoch times each batch's copy to the GPU instead.
The cache is written with random values in the real format (the features' values do not
change the bytes moved), so no teacher has to run. The pages are in the page cache (read once before).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import default_collate

from sak.config import load_recipe
from sak.digest import sha256_of, usable_cpus
from sak.engine.build import build_loader
from sak.engine.cache import FORMAT, CachedRows, FeatureCache, quantize
from sak.engine.cache.store import _atomic_save

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RECIPE = ROOT / "recipes" / "bench" / "stage1_gpu_vitb.yaml"
# (channels, grid) of each teacher's four levels in the GPU stage-1 recipe
GPU_LEVELS = {"dinov2": (768, 27), "clip": (768, 24), "sam": (768, 64)}


def write_cache(root: Path, samples: int, dtype: str, shard_size: int = 64) -> Path:
    """A cache directory with the GPU recipe's level shapes, random values, and a valid manifest."""
    gen = torch.Generator().manual_seed(0)
    shards = {}
    for shard in range((samples + shard_size - 1) // shard_size):
        rows = min(shard_size, samples - shard * shard_size)
        tensors = {}
        for tid, (c, g) in GPU_LEVELS.items():
            for level in range(4):
                x = torch.randn(rows, c, g, g, generator=gen)
                if dtype == "fp16":
                    tensors[f"{tid}/{level}"] = x.half()
                else:
                    tensors[f"{tid}/{level}"], tensors[f"{tid}/{level}/scale"] = quantize(x)
        path = root / "view0" / f"shard{shard:05d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(tensors, path)
        shards[f"view0/shard{shard:05d}"] = sha256_of(path)
    manifest = {
        "identity": {"format": FORMAT, "dtype": dtype, "views": 1, "augment": False},
        "samples": samples, "shard_size": shard_size, "shards": shards,
        "shapes": {t: [[c, g, g]] * 4 for t, (c, g) in GPU_LEVELS.items()},
        "level_dims": {t: [c] * 4 for t, (c, _) in GPU_LEVELS.items()},
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def in_flight(loader) -> int:
    """Batches a DataLoader's workers keep loading ahead: workers x prefetch factor (none without workers)."""
    return loader.num_workers * (loader.prefetch_factor or 0)


def measure(cache_root: Path, images: int, batch: int, workers: int, epochs: int) -> dict:
    recipe = load_recipe(RECIPE, [f"data.options.length={images}", f"data.batch_size={batch}",
                                  f"data.num_workers={workers}"])  # fmt: skip
    loader = build_loader(recipe, recipe.data.split, train=True, augment=False)
    cache = FeatureCache(cache_root)
    loader.dataset.views, loader.dataset.cache = cache.views, cache
    cache.verify_all()
    for path in cache_root.rglob("*.safetensors"):  # into the page cache: a warm-cache measurement
        path.read_bytes()
    per_batch, copies, nbytes = [], [], 0
    # on a GPU machine the last epoch times each batch's copy to the GPU instead of the loader
    copy_epoch = epochs - 1 if torch.cuda.is_available() and epochs > 1 else None
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        it = iter(loader)
        next(it)  # worker start-up
        for _ in range(in_flight(loader)):  # ready, or nearly, when the first arrived: not the steady rate
            next(it)
        first = time.perf_counter()
        arrived = 0
        for b in it:
            # read by the loader: on a GPU machine by its pin-memory thread (page-locked), elsewhere by the workers
            maps = b["cached"]
            now = time.perf_counter()
            nbytes = sum(v.numel() * v.element_size() for v in maps.values())
            if epoch != copy_epoch:
                arrived, last = arrived + 1, now
            else:  # what a training step waits for when the copy is not overlapped with the previous step
                cache.targets(maps, "cuda")
                torch.cuda.synchronize()
                copies.append(time.perf_counter() - now)
        if epoch != copy_epoch and arrived:
            # the epoch's rate after its first batch: (last - first arrival) / batches. Not the median gap, which
            # workers delivering in bursts (prefetched batches arrive together) would make near zero.
            per_batch.append((last - first) / arrived)
    mean = sum(per_batch) / len(per_batch)  # epochs weigh equally (they have the same number of batches)
    out = {"workers": workers, "batch": batch, "epochs_timed": len(per_batch), "batch_s": mean,
           "images_per_s": batch / mean, "mib_per_batch": nbytes / 2**20,
           "gib_per_s": nbytes / mean / 2**30}  # fmt: skip
    if copies:
        out["median_copy_s"] = statistics.median(copies)
    return out


def breakdown(cache_root: Path, images: int, batch: int) -> dict:
    """Where one batch's time goes (medians over the batches after the first), in this process: the dataset's
    images (read and collated), and the host copies of the batch's cached maps, now and before:
    - gather_s / gather_2_s: `FeatureCache.gather`, the one copy, from the shard files into new tensors, with
      one thread (what a worker does without a GPU) and with two;
    - gather_reused_s: the same with two threads into buffers allocated once and reused, as page-locked
      buffers are once PyTorch's caching host allocator holds them;
    - gather_pinned_s (on a GPU machine): `CachedRows.pin_memory`, into page-locked memory with
      `pin_threads()` threads, what the training loader's pin-memory thread does there;
    - before_s: the path before 2026-11-27, rebuilt from its parts: each sample's rows as views of the
      memory-mapped shard, collated into a new batch (a worker's copy) and copied by one thread into a buffer
      allocated once (the pin-memory thread's copy into page-locked memory). It leaves out the shared-memory
      transfer between the two, so it is a lower bound."""
    recipe = load_recipe(RECIPE, [f"data.options.length={images}", f"data.batch_size={batch}"])
    dataset = build_loader(recipe, recipe.data.split, train=False, augment=False).dataset.dataset
    cache = FeatureCache(cache_root)
    cache.verify_all()  # hashing the shards is a start-up cost, not a per-batch one
    mapped = [load_file(path) for path in sorted((cache_root / "view0").glob("shard*.safetensors"))]  # mmap'd
    reused, pinned = cache.gather(range(batch), 0), {}

    def before(indices):
        collated = default_collate([{k: mapped[i // cache.shard_size][k][i % cache.shard_size] for k in cache.keys}
                                    for i in indices])  # fmt: skip
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as PyTorch's pin-memory thread runs
        for key, value in collated.items():
            pinned.setdefault(key, torch.empty_like(value)).copy_(value)
        torch.set_num_threads(threads)

    ways = {
        "images_s": lambda indices: default_collate([dataset[i] for i in indices]),
        "gather_s": lambda indices: cache.gather(indices, 0),
        "gather_2_s": lambda indices: cache.gather(indices, 0, threads=2),
        "gather_reused_s": lambda indices: cache.gather(indices, 0, threads=2, out=reused),
        "before_s": before,
    }
    if torch.cuda.is_available():
        ways["gather_pinned_s"] = lambda indices: CachedRows(cache, indices, 0).pin_memory()
    times: dict[str, list[float]] = {key: [] for key in ways}
    for start in range(0, images - batch + 1, batch):
        indices = list(range(start, start + batch))
        for key, way in ways.items():
            t0 = time.perf_counter()
            way(indices)
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(v[1:] or v) for key, v in times.items()}


def verify(cache_root: Path, repeats: int = 3) -> dict:
    """Seconds to check every shard's sha256 (`FeatureCache.verify_all`, the start-up cost of training from a
    cache), one shard at a time and one per usable CPU (the default); pages in the page cache; best of
    `repeats`."""
    nbytes = sum(p.stat().st_size for p in cache_root.rglob("*.safetensors"))
    out = {"gib": nbytes / 2**30, "shards": len(list(cache_root.rglob("*.safetensors"))), "threads": usable_cpus()}
    for name, threads in (("one_thread_s", 1), ("threaded_s", None)):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            FeatureCache(cache_root).verify_all(threads)
            times.append(time.perf_counter() - start)
        out[name] = min(times)
    return out


def table(meta: dict, results: list[dict], command: str, parts: dict | None = None, hashing: dict | None = None) -> str:
    lines = [
        f"# Cache loader throughput ({meta['device']}, torch {meta['torch']})",
        "",
        f"Command: `{command}`. The training DataLoader with a GPU-configuration cache attached (31.6 MiB per",
        "image in fp16), iterated with nothing behind it; time per batch from the arrival of the batch after those",
        "the workers had in flight when an epoch's first arrived (workers x 2) to the epoch's last;",
        "pages in the page cache. See the module docstring of benchmarks/cache_loader.py.",
        "",
        "On a GPU machine, `to GPU (s)` is the median time of copying a batch's maps to the GPU and widening",
        "them to float32 (`FeatureCache.targets`, synchronised; not counted in the loader's time).",
        "",
        "| cache | workers | batch | MiB / batch | batch (s) | images/s | GiB/s | to GPU (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        copy = f"{r['median_copy_s']:.4f}" if "median_copy_s" in r else "-"
        lines.append(f"| {r['dtype']} | {r['workers']} | {r['batch']} | {r['mib_per_batch']:.0f} "
                     f"| {r['batch_s']:.3f} | {r['images_per_s']:.1f} | {r['gib_per_s']:.2f} | {copy} |")  # fmt: skip
    if parts:
        pinned = any("gather_pinned_s" in p for p in parts.values())
        lines += ["", "One batch's host work (median ms; `breakdown` in benchmarks/cache_loader.py): the images / the "
                  "maps read from the shard files into new tensors, 1 thread / 2 threads / into buffers reused, 2 "
                  "threads" + (" / into page-locked memory as the pin-memory thread does" if pinned else "")
                  + " / the path before 2026-11-27 (a worker's collate of memory-mapped rows, then the pin-memory "
                  "thread's one-thread copy; a lower bound).", ""]  # fmt: skip
        for dtype, p in parts.items():
            cells = [p["images_s"], p["gather_s"], p["gather_2_s"], p["gather_reused_s"]]
            cells += [p["gather_pinned_s"]] if pinned else []
            cells.append(p["before_s"])
            lines.append(f"- {dtype}: " + " / ".join(f"{c * 1e3:.0f}" for c in cells))
    if hashing:
        lines += ["", "Checking every shard's sha256 at start-up (`FeatureCache.verify_all`, best of 3, pages cached): "
                  "one shard at a time / one per usable CPU (the default).", ""]  # fmt: skip
        lines += [f"- {dtype}: {h['gib']:.2f} GiB in {h['shards']} shards: {h['one_thread_s']:.2f} s "
                  f"({h['gib'] / h['one_thread_s']:.2f} GiB/s) / {h['threaded_s']:.2f} s with {h['threads']} threads "
                  f"({h['gib'] / h['threaded_s']:.2f} GiB/s)" for dtype, h in hashing.items()]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "int8"], choices=["fp16", "int8"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--name", default="cache_loader_cpu", help="results file stem")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.epochs < 1 or min(args.workers) < 0:
        parser.error(f"--batch and --epochs must be at least 1 and --workers 0 or more; got {args.batch}, "
                     f"{args.epochs} and {args.workers}")  # fmt: skip
    ahead = 2 * max(args.workers)  # the most batches in flight (the prefetch factor is the default, 2)
    if args.images // args.batch < ahead + 3:  # start-up, the batches in flight, then at least two timed
        parser.error(f"--images must make at least {ahead + 3} batches of --batch {args.batch} an epoch with "
                     f"--workers {max(args.workers)} (the first, the {ahead} in flight when it arrives, then two "
                     f"timed); got {args.images} images ({args.images // args.batch} batches)")  # fmt: skip
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    meta = {"device": device, "machine": platform.machine(), "torch": torch.__version__}
    results, parts, hashing = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            root = write_cache(Path(tmp) / dtype, args.images, dtype)
            hashing[dtype] = verify(root)
            print(json.dumps({"dtype": dtype, "verify": hashing[dtype]}), flush=True)
            parts[dtype] = breakdown(root, args.images, args.batch)
            for workers in args.workers:
                r = {"dtype": dtype, **measure(root, args.images, args.batch, workers, args.epochs)}
                print(json.dumps(r), flush=True)
                results.append(r)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.cache_loader " + " ".join(argv if argv is not None else sys.argv[1:])
    record = meta | {"results": results, "breakdown": parts, "verify": hashing}
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=2))
    (out / f"{args.name}.md").write_text(table(meta, results, command.strip(), parts, hashing))
    print((out / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
