"""Teacher-feature cache: run the teachers once over a dataset, train from the stored outputs.

Layout of a cache directory:
    manifest.json                 status ("building" until the last shard is written, then "complete"),
                                  identity (what the features depend on), layout, shapes, shard list + sha256,
                                  the first 16 hex digits of each data file's sha256 (to name changed files)
    view{v}/shard{k:05d}.safetensors   per teacher and level: features (S, C, h, w) in fp16, or int8 plus
                                  per-(sample, channel) float32 scales; S samples per shard; each shard's
                                  metadata carries the digest of the identity and shard size it was built for

Augmentation is handled by storing `views` augmented views of every sample: view v is the dataset's
training augmentation at epoch v (augmentation is a function of (seed, epoch, index)). Training at
epoch e reads view e % views, and the dataset is told the same epoch, so the student sees exactly
the image the cached features were computed from. Without `augment` the cache holds one view, of the
un-augmented images. The price: `views` different augmentations instead of one per epoch.

A cache is refused, with the differing fields named, when the recipe's teachers or data differ from those
it was built with: the data's sample count, ids and content (the sha256 of every image file, so that an
image replaced under its own name is noticed, with the changed files named) included. A shard whose bytes
do not match its sha256 is refused as corrupt. Building is resumable (finished shards are kept, once the
manifest written before the first shard shows that they were built for the same identity and layout),
reads the images with the recipe's loader workers, and runs on N processes (shard k on process k % N).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import threading
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..config import Recipe
from ..digest import sha256_files, usable_cpus
from ..teachers import Teacher, TeacherOutput

# 2: teachers' options and metadata, sample count and ids in the identity; float32 int8 scales
# 3: the data's content digests (an image replaced under its name), teachers' channels-last and compile
FORMAT = 3
CONTENT_PREFIX = 16  # hex digits of each content digest the manifest keeps, to name the files that changed
REBUILD = "rebuild it with `sak cache build RECIPE [overrides] --out DIR` into a new directory (or delete {root} first)"


class CacheError(RuntimeError):
    """A cache that does not match the recipe, or whose files are damaged."""


def training_dataset(recipe: Recipe, augment: bool):
    """The dataset the training loader reads, built by `build_loader` itself (the recipe's tasks, subset and
    seed): with the training augmentation, PASCAL-Context and NYUD choose their crops from the semseg labels
    when those are loaded, so a dataset built without the recipe's tasks would give other images."""
    from .build import build_loader

    return build_loader(recipe, recipe.data.split, train=False, augment=augment).dataset.dataset


def ids_digest(dataset) -> str | None:
    """sha256 of the dataset's ordered sample ids: an image added, removed or renamed shifts the indices
    the cache is read by. None for a (plug-in) dataset without an `ids` list: its count is still checked."""
    ids = getattr(dataset, "ids", None)
    if ids is None:
        return None
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()


def content_digests(dataset) -> list[tuple[str, str]] | None:
    """The dataset's (name, sha256) of what its samples are made from (`SakDataset.content_digests`); None for a
    dataset without that method (a plug-in not derived from SakDataset) or made of generated samples."""
    method = getattr(dataset, "content_digests", None)
    return method() if method is not None else None


def _combined(digests: list[tuple[str, str]] | None) -> str | None:
    return None if digests is None else hashlib.sha256(json.dumps([d for _, d in digests]).encode()).hexdigest()


def _json(value):
    """As the manifest stores it (tuples become lists), so that a built identity equals its stored copy."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _teacher_identity(teacher: Teacher, config) -> dict:
    """The teacher's metadata (name, source, weights and digest, levels, mean/std, resize, extra...) and all
    of its options, defaults filled in. No option is left out: one that changes no output bit (a pure speed
    switch) is rare, and including it costs at worst a rebuild, where leaving out one that matters trains on
    wrong targets (SAM's `attention` computes the same function with other kernels, not the same bits)."""
    from ..config import build_options

    options = None
    if config is not None:
        built = build_options(type(teacher), config.options, where=config.id)
        options = dataclasses.asdict(built) if dataclasses.is_dataclass(built) else config.options
    meta = teacher.meta.as_dict()
    return {
        **meta,
        "input_size": teacher.input_size,
        "normalization": teacher.spec.normalization,
        "options": options,
        "channels_last": teacher.channels_last,  # other convolution kernels: other rounding
    }


def identity(recipe: Recipe, teachers: dict[str, Teacher], views: int, augment: bool, dtype: str,
             dataset=None, digests: list[tuple[str, str]] | None = None) -> dict:  # fmt: skip
    """Everything the cached features depend on, JSON-normalised: the teachers (metadata, options, channels-last),
    their run-time precision (bf16 teachers give other features than float32 ones) and whether they were
    compiled (other kernels), and the data: its sample count, ordered ids and the sha256 of its content (the
    image files; with `augment`, the crop-choosing labels and the names of the tasks that shape the images).
    `dataset`: the training dataset (`training_dataset`), built here when not given; `digests`: its
    `content_digests()`, computed here when not given."""
    from .build import teacher_dtype  # (imported here, as build_teachers below, to keep this module light)

    if dataset is None:
        dataset = training_dataset(recipe, augment)
    if digests is None:
        digests = content_digests(dataset)
    d = recipe.data
    data = {
        "name": d.name,
        "root": d.root,
        "split": d.split,
        "image_size": d.image_size,
        "options": d.options,
        "subset": d.subset,
        "seed": recipe.run.seed,
        "samples": len(dataset),
        "ids_sha256": ids_digest(dataset),
        "content_sha256": _combined(digests),
    }
    if augment:  # the tasks whose labels change the images (a plug-in dataset without `image_tasks`: all)
        image_tasks = getattr(dataset, "image_tasks", None)
        data["tasks"] = list(image_tasks()) if image_tasks is not None else [t.name for t in recipe.tasks]
    configs = {t.id: t for t in recipe.teachers}
    ident = {
        "format": FORMAT,
        "dtype": dtype,
        "teacher_precision": str(teacher_dtype(recipe) or torch.float32).removeprefix("torch.")
        + (" (weights cast)" if recipe.precision.teacher_weights == "cast" else ""),
        "compile_teachers": recipe.precision.compile_teachers,
        "views": views,
        "augment": augment,
        "data": data,
        "teachers": {tid: _teacher_identity(t, configs.get(tid)) for tid, t in teachers.items()},
    }
    if recipe.precision.compile_teachers and recipe.precision.compile_mode.startswith("max-autotune"):
        # max-autotune may pick other kernels (other roundings); reduce-overhead replays the default mode's
        # kernels. Absent otherwise, so that caches built before compile_mode existed still match
        ident["compile_mode"] = recipe.precision.compile_mode
    return _json(ident)


def _diff(a: dict, b: dict, prefix: str = "", theirs: str = "recipe gives") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{key}.", theirs)
        elif x != y:
            out.append(f"{prefix}{key}: cache has {x!r}, {theirs} {y!r}")
    return out


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """(S, C, h, w) float -> int8 values and float32 scales (S, C): x ~ q * scale, |error| <= scale / 2.

    Scales are float32: float16 ones underflowed to 0 for channels below ~7.6e-6 (all read back as 0),
    were subnormal, i.e. coarser than amax / 127, up to ~7.5e-4, and overflowed above ~8.3e6. Their 4 bytes
    per channel keep int8 near 25% of float32 at real map sizes (27% at 8 x 8, 31% at 4 x 4). An all-zero
    channel gets scale 0 and q 0, so it reads back exactly 0."""
    x = x.contiguous().float()  # teachers may hand out channels-last or permuted views (timm's SAM does)
    amax = x.abs().amax(dim=(2, 3))
    # a non-zero channel's step is kept a normal float32 so that x / step is exact to float32 rounding
    tiny = torch.finfo(torch.float32).tiny
    scale = torch.where(amax > 0, amax.clamp_min(127 * tiny) / 127, torch.zeros_like(amax))
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero channels: 0 / 1 = 0, not 0 / 0
    q = torch.round(x / divisor[:, :, None, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a crash right after os.replace could otherwise lose it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """The shard, and beside it its sha256 (`digest_path`), written before the shard is renamed into place: a
    shard kept by a resumed build is checked against it, whether or not the build that wrote it finished."""
    tmp = path.with_suffix(".partial")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    digest = digest_path(path)
    digest_tmp = digest.with_suffix(".partial-sha256")
    digest_tmp.write_text(sha256_files([tmp])[0])
    os.replace(digest_tmp, digest)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def digest_path(shard: Path) -> Path:
    return shard.with_suffix(".sha256")


def _write_manifest(manifest: dict, path: Path) -> None:
    """Written as the shards are: to a temporary name, synced, renamed, the rename synced."""
    tmp = path.with_suffix(".partial")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load_manifest(path: Path) -> dict:
    """A cache's manifest.json; a truncated or invalid one is a CacheError naming the file."""
    try:
        manifest = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{path} is not a valid cache manifest ({exc}); {REBUILD.format(root=path.parent)}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("identity"), dict):
        raise CacheError(f"{path} is not a valid cache manifest (no identity); {REBUILD.format(root=path.parent)}")
    return manifest


def _stamp(ident: dict, shard_size: int) -> str:
    """Digest of what a shard's bytes depend on, stored in the shard itself: a shard left by another build
    (another recipe, or another --shard-size) is recognised even when no manifest says so."""
    text = json.dumps({"identity": ident, "shard_size": shard_size}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_kept_shards(out: Path, stamp: str) -> None:
    """Refuse a directory holding shards of another build, whether or not its manifest survived."""
    for path in sorted(out.glob("view*/shard*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                found = (f.metadata() or {}).get("sak_cache")
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise CacheError(f"cache {out}: shard {path} cannot be read ({exc}); delete it to build it again") from exc
        if found != stamp:
            raise CacheError(f"cache {out}: shard {path} was written by another build (other teachers, data, "
                             f"dtype, views or --shard-size), its features cannot be reused; {REBUILD.format(root=out)}")  # fmt: skip


FP16_MAX = 65504.0


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
        if dtype == "fp16" and peak > FP16_MAX:
            raise CacheError(f"teacher {teacher!r} level {level} gave {peak:.4g} for a sample of shard {shard}, past "
                             f"float16's largest value {FP16_MAX:.0f}: an fp16 cache would store inf; build it with "
                             "--dtype int8 (per-channel scales)")  # fmt: skip


def _drop_damaged_kept_shards(out: Path, plan: CachePlan, recorded: dict[str, str]) -> None:
    """Before a build goes on from shards already there: each must match the sha256 recorded for it (in the
    finished cache's manifest, or beside the shard), else it is deleted, to be built again. Without this, the
    build would record the digest of damaged bytes, and every later check would pass them. (The main process
    hashes them all, on every usable CPU, while the others wait.)"""
    kept = [(v, k) for v, k in plan.shards() if plan.path(v, k).exists()]
    found = sha256_files([plan.path(v, k) for v, k in kept])
    for (view, shard), digest in zip(kept, found, strict=True):
        path = plan.path(view, shard)
        name = shard_name(view, shard)
        sidecar = digest_path(path)
        expected = recorded.get(name) or (sidecar.read_text().strip() if sidecar.is_file() else None)
        if digest != expected:
            why = "has no recorded sha256" if expected is None else "does not match its recorded sha256"
            print(f"[sak] cache {out}: shard {name} {why}; building it again")
            path.unlink()
            sidecar.unlink(missing_ok=True)
        elif not sidecar.is_file():  # a finished cache of an older sak: its shards get their files now
            sidecar.write_text(digest)


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


def shard_name(view: int, shard: int) -> str:
    """A shard's name in the manifest and in messages; its file is `<root>/<name>.safetensors`."""
    return f"view{view}/shard{shard:05d}"


@dataclass
class CachePlan:
    root: Path
    samples: int
    shard_size: int
    views: int

    def shards(self) -> list[tuple[int, int]]:
        per_view = (self.samples + self.shard_size - 1) // self.shard_size
        return [(v, k) for v in range(self.views) for k in range(per_view)]

    def path(self, view: int, shard: int) -> Path:
        return self.root / f"{shard_name(view, shard)}.safetensors"


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


def bytes_per_sample(shapes: dict[str, list], dtype: str) -> int:
    """Stored bytes of one sample's maps: (C, h, w) per teacher and level, 2 bytes a value in fp16, 1 in int8
    plus a float32 scale per channel (the shards' safetensors headers come on top, a few KB each)."""
    levels = [shape for per_teacher in shapes.values() for shape in per_teacher]
    if dtype == "fp16":
        return sum(2 * c * h * w for c, h, w in levels)
    return sum(c * h * w + 4 * c for c, h, w in levels)


def check_disk_space(out: Path, need: int) -> None:
    """Refuse a build whose remaining shards would not fit on the disk of `out` (free space now), before
    anything is written: one that ran out mid-way would keep its finished shards, but lose the time."""
    where = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(where).free
    if need > free:
        raise CacheError(f"{out}: the cache's remaining shards need about {need / 2**30:.2f} GiB, but only "
                         f"{free / 2**30:.2f} GiB are free on that disk; free some space or choose another --out "
                         "(--dtype int8 takes about half the size of fp16)")  # fmt: skip


def build_cache(recipe: Recipe, out: Path, views: int = 1, augment: bool = False, dtype: str = "fp16",
                shard_size: int = 256, batch_size: int = 16) -> Path:  # fmt: skip
    """Compute and store every teacher's output for the recipe's training split (resumable, N processes).

    Resuming into a directory that holds (part of) another cache, i.e. another identity, shard size or
    sample count, is a CacheError naming the differences: its shards would be kept by name otherwise."""
    from accelerate import PartialState
    from accelerate.utils import gather_object, set_seed

    from .build import build_teachers, teacher_dtype
    from .step import begin_step

    check_build_options(views, augment, dtype, shard_size, batch_size)
    out = Path(out)
    state = PartialState(cpu=not torch.cuda.is_available())
    set_seed(recipe.run.seed)  # as the trainer does before building teachers (matters for random weights)
    teachers = build_teachers(recipe, state.device)
    dataset = training_dataset(recipe, augment)
    digests = content_digests(dataset)
    ident = identity(recipe, teachers, views, augment, dtype, dataset, digests)
    plan = CachePlan(out, len(dataset), shard_size, views)
    layout = {"identity": ident, "shard_size": shard_size, "samples": len(dataset)}
    manifest_path = out / "manifest.json"
    stamp = _stamp(ident, shard_size)
    # read once, before any barrier: the main process writes a new manifest further on
    old = load_manifest(manifest_path) if manifest_path.exists() else None
    finished = old is not None and old.get("status", "complete") == "complete"
    if old is not None:  # every process checks, so that every process stops
        differences = _diff({k: old.get(k) for k in layout}, layout, theirs="this build gives")
        if differences:
            what = "an unfinished cache" if old.get("status") == "building" else "a cache"
            raise CacheError(f"{out} holds {what} built with other settings, whose shards cannot be reused: "
                             + "; ".join(differences) + f"; {REBUILD.format(root=out)}")  # fmt: skip
    _check_kept_shards(out, stamp)
    state.wait_for_everyone()  # every process has read the kept shards' stamps before any is deleted
    if state.is_main_process:
        _drop_damaged_kept_shards(out, plan, old["shards"] if finished else {})
    state.wait_for_everyone()
    shapes = {tid: [list(s) for s in t.level_shapes()] for tid, t in teachers.items()}
    remaining = [(v, k) for v, k in plan.shards() if not plan.path(v, k).exists()]
    rows = sum(min(shard_size, len(dataset) - k * shard_size) for _, k in remaining)
    per_sample = bytes_per_sample(shapes, dtype)
    need = rows * per_sample
    check_disk_space(out, need)  # every process checks, so that every process stops
    if state.is_main_process:
        print(f"[sak] cache {out}: {len(remaining)} of {len(plan.shards())} shards to write, about "
              f"{need / 2**30:.2f} GiB ({per_sample / 2**20:.2f} MiB per sample and view)")  # fmt: skip
    state.wait_for_everyone()
    level_dims = {tid: list(t.level_dims) for tid, t in teachers.items()}
    manifest = {"status": "building", **layout, "shards": {}, "shapes": shapes, "level_dims": level_dims,
                "content": None if digests is None else [d[:CONTENT_PREFIX] for _, d in digests]}  # fmt: skip
    if state.is_main_process and (remaining or not finished):  # before the first shard: a resumed build can tell
        out.mkdir(parents=True, exist_ok=True)  # whose shards it finds (a finished cache with nothing to add stays so)
        _write_manifest(manifest, manifest_path)
    state.wait_for_everyone()
    mine = [s for i, s in enumerate(plan.shards()) if i % state.num_processes == state.process_index]
    # finished by an earlier (interrupted) build of the same cache (checked above)
    todo = [(view, shard) for view, shard in mine if not plan.path(view, shard).exists()]
    loader = _view_loader(dataset, todo, plan, batch_size, recipe.data.num_workers)
    tdtype = teacher_dtype(recipe)
    progress = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="cache shards",
                    disable=not state.is_main_process)  # fmt: skip
    stored: dict[str, list[Tensor]] = {}
    for (view, shard, last), images in zip(loader.batch_sampler.owners, loader, strict=True):
        images = images.to(state.device, non_blocking=True)
        begin_step(recipe.precision.cuda_graphs)
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
                    stored.setdefault(f"{tid}/{level}{suffix}", []).append(part.cpu())
        if last:
            path = plan.path(view, shard)
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_save({key: torch.cat(parts) for key, parts in stored.items()}, path, metadata={"sak_cache": stamp})
            stored = {}
            progress.update()
    progress.close()
    # every shard's sha256 is beside it now (hashed as it was written, or checked at the start if kept); the
    # main process records them all
    names = [shard_name(v, k) for v, k in mine]
    digests = [
        (name, digest_path(plan.path(v, k)).read_text().strip()) for name, (v, k) in zip(names, mine, strict=True)
    ]
    if state.num_processes > 1:
        digests = gather_object(digests)
    if state.is_main_process:
        found = dict(digests)
        shards = {name: found[name] for name in (shard_name(v, k) for v, k in plan.shards())}
        _write_manifest({**manifest, "status": "complete", "shards": shards}, manifest_path)
    state.wait_for_everyone()
    return out


# The caches this process has open, by token: a `FeatureCache` sent to another process (a DataLoader worker)
# and back (inside a batch's `CachedRows`) comes back as the instance the training opened, with its shards
# already verified, not as a copy that would hash them again
_OPEN: weakref.WeakValueDictionary[str, FeatureCache] = weakref.WeakValueDictionary()
_OPEN_LOCK = threading.Lock()
# threads reading a batch's rows into page-locked memory for the DataLoader's pin-memory thread, at most
# (per process: the usable CPUs are shared by the processes of one machine). Two threads read about 7 GB/s
# into reused buffers on the 2-core CPU of benchmarks/results/cache_loader_cpu.md; a GPU's host needs some
# 15 GB/s at SAK's stage-1 scale with a 33 ms cached step
PIN_THREADS = 8
# safetensors' dtype names (the format's header) of what a cache stores
_STORED = {"F16": torch.float16, "I8": torch.int8, "F32": torch.float32}


def pin_threads() -> int:
    """Threads for reading a batch into page-locked memory: PIN_THREADS, or this process's share of the usable
    CPUs when fewer (LOCAL_WORLD_SIZE: the processes torchrun / accelerate start on this machine)."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(PIN_THREADS, usable_cpus() // local))


def _reopen(token: str, root: str, verified: dict[str, tuple] | None = None) -> FeatureCache:
    with _OPEN_LOCK:
        cache = _OPEN.get(token)
    if cache is None:  # a process that did not open it (a worker started by spawn): open it here, same token
        cache = FeatureCache(Path(root), token=token)
        cache._verified.update(verified or {})
    return cache


def _rows(token: str, root: str, indices: list[int], epoch: int) -> CachedRows:
    return CachedRows(_reopen(token, root), indices, epoch)


class FeatureCache:
    """Reader of a finished cache. A batch's maps are read with one copy, from the shard files straight into
    the batch's tensors (`gather`: a positioned read of each sample's row of each map); on a GPU machine the
    training loader does that in its pin-memory thread, into page-locked memory, from the `CachedRows` its
    workers hand on (`IndexedDataset.collate`). `targets` widens a batch on the device; `lookup` does both."""

    def __init__(self, root: Path, token: str | None = None) -> None:
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            raise CacheError(f"{self.root} is not a complete teacher-feature cache (no manifest.json); "
                             "build it with `sak cache build RECIPE --out DIR`")  # fmt: skip
        self.manifest = load_manifest(manifest)
        if self.manifest.get("status", "complete") != "complete":  # (format 1 wrote its manifest only when done)
            raise CacheError(f"{self.root} is an unfinished teacher-feature cache (its build stopped before the "
                             f"last shard); run the same `sak cache build ... --out {self.root}` again to finish it")  # fmt: skip
        missing = [k for k in ("shards", "samples", "shard_size", "level_dims") if k not in self.manifest]
        ident = self.manifest["identity"]
        missing += [f"identity.{k}" for k in ("views", "augment", "dtype") if k not in ident]
        if missing:
            raise CacheError(f"{manifest} is not a valid cache manifest (it lacks {', '.join(missing)}); "
                             f"{REBUILD.format(root=self.root)}")  # fmt: skip
        self.views, self.augment, self.shard_size = ident["views"], ident["augment"], self.manifest["shard_size"]
        self.samples = self.manifest["samples"]
        layout = CachePlan(self.root, self.samples, self.shard_size, self.views).shards()
        listed = set(self.manifest["shards"])
        absent = [shard_name(v, k) for v, k in layout if shard_name(v, k) not in listed]
        if absent or len(listed) != len(layout):  # so that verify_all checks every shard training will read
            raise CacheError(f"{manifest} lists {len(listed)} shards where {self.samples} samples in shards of "
                             f"{self.shard_size} x {self.views} view(s) make {len(layout)}"
                             + (f" (no entry for {', '.join(absent[:3])})" if absent else "")
                             + f"; {REBUILD.format(root=self.root)}")  # fmt: skip
        self.teachers = list(self.manifest["level_dims"])
        self.dtype = ident["dtype"]
        # the stored tensors of a sample: "<teacher>/<level>" and, for int8, "<teacher>/<level>/scale"
        self.keys = [f"{t}/{level}{suffix}" for t, dims in self.manifest["level_dims"].items()
                     for level in range(len(dims)) for suffix in ("", "/scale")[: 2 if self.dtype == "int8" else 1]]  # fmt: skip
        # per-file digests, only to name what changed
        self._content: list[str] | None = self.manifest.pop("content", None)
        self._layouts: dict[str, tuple] = {}  # shard name -> what `_layout` returns
        # shard name -> the file's signature (`_signature`) when its sha256 was checked: every read compares
        self._verified: dict[str, tuple[int, int, int, int]] = {}
        self._lock = threading.Lock()  # the pin-memory thread and the training thread may both read
        self.token = token or uuid.uuid4().hex
        with _OPEN_LOCK:
            _OPEN[self.token] = self

    def __reduce__(self):
        """Pickled as (token, root) and the shards already verified (see `_OPEN`): a worker started by spawn,
        which gets a copy, does not hash them again."""
        return _reopen, (self.token, str(self.root), dict(self._verified))

    def check(self, expected_identity: dict, digests: list[tuple[str, str]] | None = None) -> None:
        """Refuse a cache built for other teachers or data (its sample count, ids and content included), naming
        every field that differs, and with `digests` (the dataset's `content_digests()`) the files that changed."""
        built = self.manifest["identity"]
        if built != expected_identity:
            differences = _diff(built, expected_identity)
            changed = self._changed_files(digests)
            if changed:
                named = ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else "")
                differences.append(f"{len(changed)} of {len(digests)} file(s) changed since the build: {named}")
            raise CacheError(f"stale cache {self.root}: " + "; ".join(differences)
                             + f"; {REBUILD.format(root=self.root)}")  # fmt: skip

    def _changed_files(self, digests: list[tuple[str, str]] | None) -> list[str]:
        """The names whose digests differ from the build's, when both lists cover the same files."""
        if digests is None or self._content is None or len(digests) != len(self._content):
            return []
        return [name for (name, d), old in zip(digests, self._content, strict=True) if d[:CONTENT_PREFIX] != old]

    def verify_all(self, threads: int | None = None, part: tuple[int, int] = (0, 1), share=None) -> None:
        """Check every shard's sha256 now, once, `threads` shards at a time (`sha256_files`; default: one per
        usable CPU): DataLoader workers are rebuilt every epoch and would otherwise hash each shard again in
        every worker. On N processes, `part` = (i, N) hashes every N-th shard from the i-th, and `share` (a
        gather of Python lists over the processes, e.g. Accelerate's `gather_object`) pools what each found,
        so that the cache is read once, not N times, and every process refuses a bad shard alike."""
        names = [name for name in self.manifest["shards"] if name not in self._verified]
        problems, signatures = self._problems(names[part[0] :: part[1]], threads)
        if share is not None:
            problems = share(problems)  # every process takes part, whatever it found
        for name in (n for n in names if n not in signatures):  # the other processes' shards, as this one sees
            path = self._present(name)  # them now (st_dev differs between NFS clients)
            if path is not None:
                signatures[name] = _signature(path.stat())
        if problems:
            raise CacheError(f"cache {self.root}: " + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
        self._verified.update(signatures)

    def _problems(self, names: list[str], threads: int | None = None) -> tuple[list[str], dict[str, tuple]]:
        """What is wrong with these shards ("shard X is missing" / "is corrupt ..."), without raising, and the
        signatures of those found intact: the same before and after their bytes were hashed."""
        problems, present = [], []
        for name in names:
            path = self._present(name)
            if path is None:
                problems.append(f"shard {name} is missing")
            else:
                present.append((name, path, _signature(path.stat())))
        digests = sha256_files([path for _, path, _ in present], threads)
        signatures = {}
        for (name, path, before), digest in zip(present, digests, strict=True):
            if digest != self.manifest["shards"][name]:
                problems.append(f"shard {name} is corrupt (sha256 differs from the manifest)")
            elif _signature(path.stat()) != before:
                problems.append(f"shard {name} changed while it was being checked")
            else:
                signatures[name] = before
        return problems, signatures

    def _verify(self, names: list[str]) -> None:
        problems, signatures = self._problems(names)
        if problems:
            raise CacheError(f"cache {self.root}: " + "; ".join(problems))
        self._verified.update(signatures)

    def _present(self, name: str) -> Path | None:
        """The shard's file, if the manifest lists it and it is there."""
        path = self.root / f"{name}.safetensors"
        return path if name in self.manifest["shards"] and path.is_file() else None

    def _layout(
        self, view: int, shard: int
    ) -> tuple[Path, dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]], tuple]:
        """A shard's file; per key, (offset of its first row, bytes per row, dtype, row shape), from the
        safetensors header (8 bytes of little-endian length, then JSON naming each tensor's dtype, shape and
        byte range: tensors are stored C-contiguous); and the file's signature when its sha256 was checked,
        which every read compares (`_signature`): a shard changed or replaced since (a cache rebuilt at its path
        during the run) is an error, not unchecked bytes. Read here rather than through safetensors, which has no
        call that reads rows into a buffer the caller gives (page-locked memory); its memory maps, kept open for
        a run, would turn a shard cut short under the run into a SIGBUS that kills the training process."""
        name = shard_name(view, shard)
        with self._lock:
            if name not in self._layouts:
                if name not in self._verified:
                    self._verify([name])
                path = self._present(name)
                if path is None:  # (verified earlier, deleted since)
                    raise CacheError(f"cache {self.root}: shard {name} is missing")
                signature = self._verified[name]
                with open(path, "rb") as f:
                    self._check_unchanged(f, name, signature)
                    try:
                        start = 8 + int.from_bytes(f.read(8), "little")
                        header = json.loads(f.read(start - 8))
                    except ValueError as exc:  # (its bytes passed the sha256 check: a cache built wrong)
                        raise CacheError(f"cache {self.root}: shard {name} has no readable header ({exc}); "
                                         f"{REBUILD.format(root=self.root)}") from exc  # fmt: skip
                rows = min(self.shard_size, self.samples - shard * self.shard_size)
                shapes = self.manifest.get("shapes", {})
                layout = {}
                for key in self.keys:
                    tid, level = key.split("/")[:2]
                    if key.endswith("/scale"):
                        want = [rows, self.manifest["level_dims"][tid][int(level)]]
                    else:
                        want = [rows, *shapes[tid][int(level)]] if tid in shapes else None
                    info = header.get(key)
                    if (not isinstance(info, dict) or info.get("dtype") not in _STORED
                            or not info.get("shape") or info["shape"][0] != rows
                            or (want is not None and info["shape"] != want)):  # fmt: skip
                        raise CacheError(f"cache {self.root}: shard {name} holds no {key!r} of shape {want or rows} "
                                         f"(its header: {info}); {REBUILD.format(root=self.root)}")  # fmt: skip
                    begin, end = info["data_offsets"]
                    layout[key] = (
                        start + begin,
                        (end - begin) // rows,
                        _STORED[info["dtype"]],
                        tuple(info["shape"][1:]),
                    )
                self._layouts[name] = (path, layout, signature)
            return self._layouts[name]

    def _check_unchanged(self, f, name: str, signature: tuple) -> None:
        if _signature(os.fstat(f.fileno())) != signature:
            raise CacheError(f"cache {self.root}: shard {name} changed since its sha256 was checked (rebuilt or "
                             "replaced during the run?); start the run again to check it anew")  # fmt: skip

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= int(index) < self.samples:
            raise CacheError(f"cache {self.root}: sample index {index} is out of range: the cache holds "
                             f"{self.samples} samples (built for another dataset?); {REBUILD.format(root=self.root)}")  # fmt: skip
        return divmod(int(index), self.shard_size)

    def rows(self, index: int, epoch: int) -> dict[str, Tensor]:
        """Sample `index`'s cached maps for the view epoch `epoch` trains on, in their stored dtype:
        "<teacher>/<level>" (C, h, w) fp16 or int8, and for int8 "<teacher>/<level>/scale" (C,) float32."""
        return {key: value[0] for key, value in self.gather([index], epoch).items()}

    def gather(self, indices: list[int], epoch: int, pin: bool = False, threads: int = 1,
               out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:  # fmt: skip
        """The `rows` of samples `indices`, stacked per key: one copy, read from the shard files straight into
        new tensors (page-locked with `pin`; in shared memory inside a DataLoader worker, as `default_collate`
        makes them, so that the batch crosses to the training process without another copy) or into `out`.
        `threads` read samples in parallel (the reads release the GIL)."""
        view = epoch % self.views
        located = [self._locate(i) for i in indices]
        if not located:
            raise ValueError("FeatureCache.gather: no sample indices given")
        layouts = {shard: self._layout(view, shard) for shard in dict.fromkeys(s for s, _ in located)}
        _, first, _ = next(iter(layouts.values()))
        if out is None:
            shared = torch.utils.data.get_worker_info() is not None and not pin
            out = {
                key: _empty((len(indices), *shape), dtype, pin, shared) for key, (_, _, dtype, shape) in first.items()
            }

        def read(j: int) -> None:
            shard, row = located[j]
            path, layout, signature = layouts[shard]
            name = shard_name(view, shard)
            try:
                with open(path, "rb", buffering=0) as f:  # one file object per read: no shared file position
                    self._check_unchanged(f, name, signature)
                    for key, (offset, size, _, _) in layout.items():
                        f.seek(offset + row * size)
                        if _read_into(f, memoryview(out[key][j].numpy()).cast("B")) != size:
                            raise CacheError(f"cache {self.root}: shard {name} is shorter than its header says (cut "
                                             f"short since it was checked?); {REBUILD.format(root=self.root)}")  # fmt: skip
            except OSError as exc:
                raise CacheError(f"cache {self.root}: reading shard {name} failed: {exc}") from exc

        if threads > 1 and len(indices) > 1:
            with ThreadPoolExecutor(min(threads, len(indices)), thread_name_prefix="sak-cache") as pool:
                list(pool.map(read, range(len(indices))))
        else:
            for j in range(len(indices)):
                read(j)
        return out

    def targets(self, rows, device: torch.device | str = "cpu") -> dict[str, TeacherOutput]:
        """A batch's maps -> float32 teacher outputs on `device`. `rows`: the batch's `CachedRows` (read here,
        unless the loader's pin-memory thread has read them already) or what `gather` returns. The stored dtype
        crosses to the device as it is (half, or a quarter, of the float32 bytes) and is widened / dequantised
        there."""
        if isinstance(rows, CachedRows):  # (a loader that neither pinned nor read them)
            rows = rows.read()
        device = torch.device(device)
        result = {}
        for tid, dims in self.manifest["level_dims"].items():
            levels = []
            for level in range(len(dims)):
                key = f"{tid}/{level}"
                x = rows[key].to(device, non_blocking=True).float()
                if self.dtype == "int8":
                    x = x * rows[f"{key}/scale"].to(device, non_blocking=True).float()[:, :, None, None]
                levels.append(x)
            result[tid] = TeacherOutput(tuple(levels))
        return result

    def lookup(self, indices: list[int], epoch: int, device: torch.device | str = "cpu") -> dict[str, TeacherOutput]:
        """`targets` of samples `indices` (read into page-locked memory for a CUDA device)."""
        return self.targets(self.gather(indices, epoch, pin=torch.device(device).type == "cuda"), device)

    def level_dims(self) -> dict[str, tuple[int, ...]]:
        return {t: tuple(d) for t, d in self.manifest["level_dims"].items()}


class CachedRows:
    """A batch's cached maps before they are read: which cache, samples and epoch. The training loader's
    collate (`IndexedDataset.collate`) makes one per batch. A loader that pins its batches (on a GPU machine)
    hands it on as the batch's "cached": DataLoader workers then read none of the maps, only this small
    object crosses to the training process, and there the DataLoader's pin-memory step calls `pin_memory`,
    which reads the rows straight into page-locked memory (`FeatureCache.gather`, `pin_threads()` threads)
    while the training step runs (with workers; without them the loader pins in its own next()). A loader
    that does not pin reads them in its collate (in the worker, or in the loader's own next() without
    workers), so training on the CPU never waits for them inside a step.
    Before, a worker collated each sample's rows into shared memory and the pin-memory thread copied the
    batch again with one thread: three host copies of 505 MB a batch at SAK's stage-1 scale
    (benchmarks/results/cache_loader_cpu.md)."""

    def __init__(self, cache: FeatureCache, indices: list[int], epoch: int) -> None:
        self.cache, self.indices, self.epoch = cache, [int(i) for i in indices], int(epoch)

    def read(self, pin: bool = False) -> dict[str, Tensor]:
        """`FeatureCache.gather` of these samples: page-locked with `pin_threads()` threads, else with one (a
        worker's share) or, outside a worker, this process's intra-op thread count."""
        if pin:
            threads = pin_threads()
        else:
            threads = 1 if torch.utils.data.get_worker_info() is not None else torch.get_num_threads()
        return self.cache.gather(self.indices, self.epoch, pin=pin, threads=threads)

    def pin_memory(self, device=None) -> dict[str, Tensor]:
        """Called by the DataLoader's pin-memory step (torch.utils.data._utils.pin_memory)."""
        return self.read(pin=True)

    def __reduce__(self):
        """Pickled as the cache's (token, root), sample indices and epoch: a few hundred bytes a batch."""
        return _rows, (self.cache.token, str(self.cache.root), self.indices, self.epoch)

    def __repr__(self) -> str:
        return f"CachedRows({self.cache.root}, {len(self.indices)} samples, epoch {self.epoch})"


def _signature(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is replaced, cut short or written: its device, inode, size and mtime."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _read_into(f, buffer: memoryview) -> int:
    """Fill `buffer` from `f`'s position (a read may return fewer bytes than asked); the bytes read, fewer at
    the end of the file. FileIO.readinto releases the GIL while it reads."""
    done = 0
    while done < len(buffer):
        got = f.readinto(buffer[done:])
        if not got:
            break
        done += got
    return done


def _empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool, shared: bool) -> Tensor:
    if shared:  # what default_collate does in a worker (PyTorch has no public call for it)
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


def describe(root: Path) -> list[str]:
    """What a cache directory holds, in lines for `sak cache info`: its state, layout and size, the teachers
    and data it was built for (a finished or an unfinished build)."""
    root = Path(root)
    if not (root / "manifest.json").is_file():
        raise CacheError(f"{root} is not a teacher-feature cache (no manifest.json)")
    manifest = load_manifest(root / "manifest.json")
    ident, shards = manifest["identity"], manifest.get("shards", {})
    views, samples, size = ident.get("views", 1), manifest.get("samples"), manifest.get("shard_size")
    plan = CachePlan(root, samples, size, views)
    planned = plan.shards() if samples and size else []
    written = [p for p in (plan.path(v, k) for v, k in planned) if p.is_file()]
    mib = sum(p.stat().st_size for p in written) / 2**20
    if manifest.get("status", "complete") == "complete":
        state = f"complete, {len(shards)} shards"
    else:
        state = f"unfinished build, {len(written)} of {len(planned)} shards written"
    kind = f"{views} augmented view(s)" if ident.get("augment") else "un-augmented images"
    lines = [
        f"cache {root}: {state}, format {ident.get('format')}",
        f"  {ident.get('dtype')}, {kind}, {samples} samples in shards of {size}, {mib:.1f} MiB on disk"
        + (f" ({mib / (samples * views):.2f} MiB per sample and view)" if samples and written else ""),
        f"  teachers ({ident.get('teacher_precision')}{', compiled' if ident.get('compile_teachers') else ''}"
        + (f" ({ident['compile_mode']})" if "compile_mode" in ident else "")
        + "):",
    ]
    shapes = manifest.get("shapes", {})
    for tid, t in ident.get("teachers", {}).items():
        maps = ", ".join("x".join(map(str, shape)) for shape in shapes.get(tid, []))
        weights = t.get("weights") + (f" (sha256 {t['sha256'][:12]})" if t.get("sha256") else "")
        lines.append(f"    {tid}: {t.get('name')} from {t.get('source')}, weights {weights}, input {t.get('input_size')} px, "
                     f"levels {t.get('levels')}: maps {maps}")  # fmt: skip
    d = ident.get("data", {})
    content = d.get("content_sha256")
    lines += [
        f"  data: {d.get('name')} at {d.get('root')}, split {d.get('split')}, image size {d.get('image_size')}, "
        f"subset {d.get('subset')}, seed {d.get('seed')}, options {d.get('options')}"
        + (f", tasks {d['tasks']}" if "tasks" in d else ""),
        f"  ids sha256 {str(d.get('ids_sha256'))[:16]}, content sha256 "
        + (content[:16] if content else "none (generated data, or a dataset without content_digests)"),
    ]
    return lines


def cache_digest(root: Path) -> str:
    """A short id of a cache's manifest (for logs)."""
    return hashlib.sha256((Path(root) / "manifest.json").read_bytes()).hexdigest()[:12]
