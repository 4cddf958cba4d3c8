"""`build_cache`: run the teachers over the training data once and write the shards (resumable, N processes)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from ...config import Recipe
from ...digest import hash_threads, local_processes, sha256_files
from ...files import refuse_dangling_link
from .identity import _diff, as_now, content_digests, identity, training_dataset
from .store import (
    CONTENT_PREFIX,
    MAX_SHARDS,
    REBUILD,
    CacheError,
    CachePlan,
    _atomic_save,
    _write_digest,
    _write_manifest,
    bytes_per_sample,
    digest_path,
    load_manifest,
    quantize,
    shard_name,
)


def _stamp(ident: dict, shard_size: int) -> str:
    """Digest of what a shard's bytes depend on, stored in the shard itself: a shard left by another build
    (another recipe, or another --shard-size) is recognised even when no manifest says so."""
    text = json.dumps({"identity": ident, "shard_size": shard_size}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _recorded_digest(path: Path, name: str, recorded: dict[str, str]) -> str | None:
    """The sha256 a kept shard was written with: the finished cache's manifest (`recorded`), else the file beside
    it; None for neither (an older sak's interrupted build)."""
    sidecar = digest_path(path)
    # (bytes decoded leniently: a damaged file may hold bytes that are no text, and then matches nothing)
    return recorded.get(name) or (
        sidecar.read_bytes().decode("ascii", "replace").strip() if sidecar.is_file() else None
    )


def _check_kept_shards(out: Path, stamp: str, plan: CachePlan, recorded: dict[str, str]) -> None:
    """Refuse a directory holding shards of another build, whether or not its manifest survived. A shard of this
    build's plan whose bytes do not match the sha256 recorded for it (in the finished manifest, `recorded`, or
    beside it) is damaged, not another build's, even where the damage hit its header or stamp: it is let
    through, for `_drop_damaged_kept_shards` to delete and build again."""
    ours = {plan.path(v, k): shard_name(v, k) for v, k in plan.shards()}
    for path in sorted(out.glob("view*/shard*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                found, unreadable = (f.metadata() or {}).get("sak_cache"), None
        except Exception as exc:  # safetensors raises its own error types for damaged files
            found, unreadable = None, exc
        if found == stamp:
            continue
        expected = _recorded_digest(path, ours[path], recorded) if path in ours else None
        if expected is not None and sha256_files([path])[0] != expected:
            continue  # damaged since it was written: deleted and built again
        if unreadable is not None:
            raise CacheError(f"cache {out}: shard {path} cannot be read ({unreadable}); delete it to build it "
                             "again") from unreadable  # fmt: skip
        raise CacheError(f"cache {out}: shard {path} was written by another build (other teachers, data, "
                         f"dtype, views or --shard-size), its features cannot be reused; {REBUILD.format(root=out)}")  # fmt: skip


FP16_MAX = 65504.0
FP16_OVERFLOW = 65520.0  # the least magnitude float16 rounds to inf; from 65504 up to it, values round to 65504


def _check_storable(levels, dtype: str, teacher: str, shard: str) -> None:
    """Refuse teacher outputs the cache would store as something else: a non-finite value (int8 would turn its
    channel into NaN for an inf, or into zeros for a NaN; online training would see it), or for fp16 a magnitude
    past float16's range (stored as inf, where the online float32 target is finite). One host sync per teacher
    and batch (the copies of its maps to the host that follow wait for the same work)."""
    # the largest magnitude without a full-size temporary; a NaN anywhere makes it NaN
    peaks = torch.stack([torch.linalg.vector_norm(t.detach(), float("inf")).float() for t in levels]).cpu()
    for level, peak in enumerate(peaks.tolist()):
        if not math.isfinite(peak):
            raise CacheError(f"teacher {teacher!r} level {level} gave a non-finite value (nan or inf) for a sample of "
                             f"shard {shard}; a cache would store it as something else: check the teacher and its "
                             "precision (precision.teachers)")  # fmt: skip
        if dtype == "fp16" and peak >= FP16_OVERFLOW:
            raise CacheError(f"teacher {teacher!r} level {level} gave {peak:.4g} for a sample of shard {shard}, past "
                             f"float16's largest value {FP16_MAX:.0f}: an fp16 cache would store inf; build it with "
                             "--dtype int8 (per-channel scales)")  # fmt: skip


def _drop_damaged_kept_shards(
    out: Path, plan: CachePlan, recorded: dict[str, str], part: tuple[int, int] = (0, 1)
) -> None:
    """Before a build goes on from shards already there: each must match the sha256 recorded for it (in the
    finished cache's manifest, or beside the shard), else it is deleted, to be built again. Without this, the
    build would record the digest of damaged bytes, and every later check would pass them. On N processes,
    `part` = (i, N): the i-th checks the shards it writes (every N-th from the i-th, as `build_cache` shares
    them), on its share of the CPUs; the main process hashing them all made the others wait at a barrier
    that times out (30 minutes by default: about 2 TB at the page cache's speed)."""
    index, n = part
    kept = [(v, k) for i, (v, k) in enumerate(plan.shards()) if i % n == index and plan.path(v, k).exists()]
    found = sha256_files([plan.path(v, k) for v, k in kept], hash_threads(local_processes(n)))
    for (view, shard), digest in zip(kept, found, strict=True):
        path = plan.path(view, shard)
        name = shard_name(view, shard)
        sidecar = digest_path(path)
        expected = _recorded_digest(path, name, recorded)
        if digest != expected:
            why = "has no recorded sha256" if expected is None else "does not match its recorded sha256"
            print(f"[sak] cache {out}: shard {name} {why}; building it again")
            path.unlink()
            sidecar.unlink(missing_ok=True)
        elif not sidecar.is_file() or sidecar.read_bytes().strip() != digest.encode():
            # a finished cache of an older sak (no file), or a file damaged beside an intact shard: the manifest
            # written at the end of the build takes each shard's digest from this file
            _write_digest(sidecar, digest)


def check_build_options(views: int, augment: bool, dtype: str, shard_size: int, batch_size: int) -> None:
    """Refuse settings that cannot give a usable cache (ValueError), before anything is built."""
    if dtype not in ("fp16", "int8"):
        raise ValueError(f"cache dtype must be fp16 or int8, got {dtype!r}")
    for name, value in (("views", views), ("shard size", shard_size), ("batch size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"cache {name} must be a positive integer, got {value!r}")
    if views > 1 and not augment:
        raise ValueError(f"{views} views without augment would be {views} copies of the same un-augmented "
                         "features; add --augment (view v = the training augmentation at epoch v) or use --views 1")  # fmt: skip


class _ViewImages(torch.utils.data.Dataset):
    """Item (view, index): sample `index`'s image under the dataset's augmentation of epoch `view`."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Tensor:
        view, index = key
        self.dataset.set_epoch(view)  # (each loader worker holds its own copy of the dataset)
        image_at = getattr(self.dataset, "image_at", None)  # (a SakDataset's reads no unneeded target)
        return image_at(index) if image_at is not None else self.dataset[index]["image"]


class _ShardBatches(torch.utils.data.Sampler):
    """Batches of (view, index) that never cross a shard, in shard order; `owners[b]` = (view, shard,
    whether batch b is the shard's last)."""

    def __init__(self, shards: list[tuple[int, int]], plan: CachePlan, batch_size: int) -> None:
        self.batches, self.owners = [], []
        for view, shard in shards:
            indices = range(shard * plan.shard_size, min((shard + 1) * plan.shard_size, plan.samples))
            starts = range(0, len(indices), batch_size)
            for start in starts:
                self.batches.append([(view, i) for i in indices[start : start + batch_size]])
                self.owners.append((view, shard, start == starts[-1]))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _view_loader(dataset, shards: list[tuple[int, int]], plan: CachePlan, batch_size: int, workers: int):
    """The images of `shards`, read by `workers` loader processes (`data.num_workers`) while the teachers run."""
    return torch.utils.data.DataLoader(
        _ViewImages(dataset),
        batch_sampler=_ShardBatches(shards, plan, batch_size),
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
    )


def check_disk_space(out: Path, need: int) -> None:
    """Refuse a build whose remaining shards would not fit on the disk of `out` (free space now), before
    anything is written: one that ran out mid-way would keep its finished shards, but lose the time."""
    where = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(where).free
    if need > free:
        raise CacheError(f"{out}: the cache's remaining shards need about {size(need)}, but only {size(free)} are "
                         "free on that disk; free some space or choose another --out (--dtype int8 takes about half "
                         "the size of fp16)")  # fmt: skip


def size(n: int) -> str:
    """Bytes in GiB, MiB below 1 GiB, KiB below 1 MiB ("0.00 GiB" said nothing of a small cache)."""
    return next(f"{n / 2**p:.{d}f} {unit}" for p, d, unit in ((30, 2, "GiB"), (20, 1, "MiB"), (10, 0, "KiB"))
                if n >= 2**p or unit == "KiB")  # fmt: skip


def build_cache(recipe: Recipe, out: Path, views: int = 1, augment: bool = False, dtype: str = "fp16",
                shard_size: int = 256, batch_size: int = 16) -> Path:  # fmt: skip
    """Compute and store every teacher's output for the recipe's training split (resumable, N processes).

    Resuming into a directory that holds (part of) another cache, i.e. another identity, shard size or
    sample count, is a CacheError naming the differences: its shards would be kept by name otherwise."""
    from accelerate import PartialState
    from accelerate.utils import gather_object, set_seed

    from ..build import build_teachers

    check_build_options(views, augment, dtype, shard_size, batch_size)
    out = Path(out)
    refuse_dangling_link(out, "--out")
    if out.exists() and not out.is_dir():  # (a FileExistsError after the teachers were built and the plan printed)
        raise CacheError(f"--out {out}: a file; a cache is a folder (manifest.json and its shards), give another path")
    state = PartialState(cpu=not torch.cuda.is_available())
    set_seed(recipe.run.seed)  # as the trainer does before building teachers (matters for random weights)
    teachers = build_teachers(recipe, state.device)
    dataset = training_dataset(recipe, augment)
    if views * -(-len(dataset) // shard_size) > MAX_SHARDS:  # (a cache reading refuses, after hours of building)
        raise CacheError(f"{views} view(s) of {len(dataset)} samples in shards of {shard_size} make more than "
                         f"{MAX_SHARDS} shards; use a larger --shard-size")  # fmt: skip
    # the maps of the data's images (one size: the shards stack them); a letterboxing teacher's are cut to the image
    image_hw = tuple(_ViewImages(dataset)[(0, 0)].shape[-2:]) if len(dataset) else None
    for teacher in teachers.values() if image_hw else ():
        teacher.check_image_size(image_hw)
    digests = content_digests(dataset, shared=True)  # (every process is here)
    ident = _kept_identity(out / "manifest.json", identity(recipe, teachers, views, augment, dtype, dataset, digests))
    plan = CachePlan(out, len(dataset), shard_size, views)
    layout = {"identity": ident, "shard_size": shard_size, "samples": len(dataset)}
    manifest_path = out / "manifest.json"
    stamp = _stamp(ident, shard_size)
    finished = _take_over(out, layout, stamp, plan, state)
    shapes = {tid: [list(s) for s in (t.map_shapes(image_hw) if image_hw else t.level_shapes())]
              for tid, t in teachers.items()}  # fmt: skip
    remaining = [(v, k) for v, k in plan.shards() if not plan.path(v, k).exists()]
    rows = sum(min(shard_size, len(dataset) - k * shard_size) for _, k in remaining)
    per_sample = bytes_per_sample(shapes, dtype)
    need = rows * per_sample
    # every process checks, so that every process stops; 64 KiB a shard for its header, its sha256 file and the
    # disk's block rounding (a nearly full disk passed the check and filled up at the last shards)
    check_disk_space(out, need + len(remaining) * 2**16)
    if state.is_main_process:
        print(f"[sak] cache {out}: {len(remaining)} of {len(plan.shards())} shards to write, about "
              f"{size(need)} ({per_sample / 2**20:.2f} MiB per sample and view)")  # fmt: skip
    state.wait_for_everyone()
    level_dims = {tid: list(t.level_dims) for tid, t in teachers.items()}
    manifest = {"status": "building", **layout, "shards": {}, "shapes": shapes, "level_dims": level_dims,
                "content": None if digests is None else {name: d[:CONTENT_PREFIX] for name, d in digests}}  # fmt: skip
    if state.is_main_process and (remaining or not finished):  # before the first shard: a resumed build can tell
        out.mkdir(parents=True, exist_ok=True)  # whose shards it finds (a finished cache with nothing to add stays so)
        _write_manifest(manifest, manifest_path)
    state.wait_for_everyone()
    mine = [s for i, s in enumerate(plan.shards()) if i % state.num_processes == state.process_index]
    # finished by an earlier (interrupted) build of the same cache (checked above)
    todo = [(view, shard) for view, shard in mine if not plan.path(view, shard).exists()]
    loader = _view_loader(dataset, todo, plan, batch_size, recipe.data.num_workers)
    # the main process's bar counts its own shards, and says so: with N processes it is 1/N of the cache
    share = f" (process 0's {len(mine)} of {len(plan.shards())})" if state.num_processes > 1 else ""
    progress = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"cache shards{share}",
                    disable=not state.is_main_process)  # fmt: skip
    _write_shards(loader, teachers, recipe, dtype, plan, stamp, state.device, progress)
    progress.close()
    # every shard's sha256 is beside it now (hashed as it was written, or checked at the start if kept); the
    # main process records them all
    shard_digests = [(shard_name(v, k), digest_path(plan.path(v, k)).read_text().strip()) for v, k in mine]
    if state.num_processes > 1:
        shard_digests = gather_object(shard_digests)
    if state.is_main_process:
        found = dict(shard_digests)
        shards = {name: found[name] for name in (shard_name(v, k) for v, k in plan.shards())}
        _write_manifest({**manifest, "status": "complete", "shards": shards}, manifest_path)
    state.wait_for_everyone()
    return out


def _kept_identity(manifest_path: Path, ident: dict) -> dict:
    """The identity to build under: that of the cache already in `out` where it is this one as an older sak wrote
    it (data.options at their defaults written out), whose shards' stamps hold it and which training accepts;
    else this build's own (a damaged or other manifest is for `_take_over` to name)."""
    try:
        built = load_manifest(manifest_path).get("identity") if manifest_path.exists() else None
    except CacheError:
        return ident
    return built if isinstance(built, dict) and built != ident and as_now(built) == ident else ident


def _take_over(out: Path, layout: dict, stamp: str, plan: CachePlan, state) -> bool:
    """Check what `out` already holds against this build (every process, so that every process stops) and
    delete the kept shards that are damaged; whether it holds a finished cache."""
    manifest_path = out / "manifest.json"
    # read once, before any barrier: the main process writes a new manifest further on
    old = load_manifest(manifest_path) if manifest_path.exists() else None
    finished = old is not None and old.get("status", "complete") == "complete"
    if old is not None:
        differences = _diff({k: old.get(k) for k in layout}, layout, theirs="this build gives")
        if differences:
            what = "an unfinished cache" if old.get("status") == "building" else "a cache"
            raise CacheError(f"{out} holds {what} built with other settings, whose shards cannot be reused: "
                             + "; ".join(differences) + f"; {REBUILD.format(root=out)}")  # fmt: skip
    recorded = old["shards"] if finished else {}
    _check_kept_shards(out, stamp, plan, recorded)
    state.wait_for_everyone()  # every process has read the kept shards' stamps before any is deleted
    _drop_damaged_kept_shards(out, plan, recorded, (state.process_index, state.num_processes))
    state.wait_for_everyone()
    return finished


def _write_shards(loader, teachers: dict, recipe: Recipe, dtype: str, plan: CachePlan, stamp: str, device,
                  progress) -> None:  # fmt: skip
    """Run the teachers over the loader's batches (each inside one shard, in order) and write each shard at
    its last batch."""
    from ..build import teacher_dtype
    from ..step import begin_step

    tdtype = teacher_dtype(recipe)
    # the shard's tensors, allocated at its first batch and filled batch by batch: one copy of the shard in host
    # memory (a list of batches joined by torch.cat at the end held two)
    stored: dict[str, Tensor] = {}
    filled = 0
    for (view, shard, last), images in zip(loader.batch_sampler.owners, loader, strict=True):
        images = images.to(device, non_blocking=True)
        begin_step(recipe.precision.cuda_graphs)
        rows = min(plan.shard_size, plan.samples - shard * plan.shard_size)
        for tid, teacher in teachers.items():
            levels = teacher.encode(images, tdtype).levels
            _check_storable(levels, dtype, tid, shard_name(view, shard))
            for level, feat in enumerate(levels):
                # converted on the device: the copy to the host and the shard's host memory are the stored
                # bytes (the fp16 cast rounds the same on any device, so the cache still equals online fp16)
                if dtype == "fp16":
                    parts = [feat.half().contiguous()]
                else:
                    parts = list(quantize(feat))
                for suffix, part in zip(("", "/scale"), parts, strict=False):
                    key = f"{tid}/{level}{suffix}"
                    if key not in stored:
                        stored[key] = torch.empty((rows, *part.shape[1:]), dtype=part.dtype)
                    stored[key][filled : filled + len(part)].copy_(part)
        filled += len(images)
        if last:
            if filled != rows:  # (the loader's batches of a shard cover its rows, in order, once)
                raise RuntimeError(f"shard {shard_name(view, shard)} got {filled} rows of {rows}")
            path = plan.path(view, shard)
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_save(stored, path, metadata={"sak_cache": stamp})
            stored, filled = {}, 0
            progress.update()
