"""Teacher-feature cache: run the teachers once over a dataset, train from the stored outputs.

Layout of a cache directory:
    manifest.json                 identity (what the features depend on), shapes, shard list + sha256
    view{v}/shard{k:05d}.safetensors   per teacher and level: features (S, C, h, w) in fp16, or int8 plus
                                  per-(sample, channel) float32 scales; S samples per shard

Augmentation is handled by storing `views` augmented views of every sample: view v is the dataset's
training augmentation at epoch v (augmentation is a function of (seed, epoch, index)). Training at
epoch e reads view e % views, and the dataset is told the same epoch, so the student sees exactly
the image the cached features were computed from. With `views: 1` and `augment: false` the cache
holds the un-augmented images. The price: `views` different augmentations instead of one per epoch.

A cache is refused, with the differing fields named, when the recipe's teachers or data differ from
those it was built with; a shard whose bytes do not match its sha256 is refused as corrupt.
Building is resumable (finished shards are kept) and runs on N processes (shard k on process
k % N).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from ..config import Recipe
from ..teachers import Teacher, TeacherOutput
from ..teachers.weights import sha256_of

FORMAT = 1


class CacheError(RuntimeError):
    """A cache that does not match the recipe, or whose files are damaged."""


def identity(recipe: Recipe, teachers: dict[str, Teacher], views: int, augment: bool, dtype: str) -> dict:
    """Everything the cached features depend on (the teachers' run-time precision too: bf16 teachers give
    other features than float32 ones)."""
    from .build import teacher_dtype  # (imported here, as build_teachers below, to keep this module light)

    d = recipe.data
    return {
        "format": FORMAT,
        "dtype": dtype,
        "teacher_precision": str(teacher_dtype(recipe) or torch.float32).removeprefix("torch.")
        + (" (weights cast)" if recipe.precision.teacher_weights == "cast" else ""),
        "views": views,
        "augment": augment,
        "data": {
            "name": d.name,
            "root": d.root,
            "split": d.split,
            "image_size": d.image_size,
            "options": d.options,
            "subset": d.subset,
            "seed": recipe.run.seed,
        },  # fmt: skip
        "teachers": {
            tid: {
                "name": t.meta.name,
                "source": t.meta.source,
                "weights": t.meta.weights,
                "sha256": t.meta.sha256,
                "levels": list(t.meta.levels),
                "input_size": t.input_size,
                "normalization": t.spec.normalization,
                "mean": list(t.meta.mean),
                "std": list(t.meta.std),
                "num_params": t.meta.num_params,
            }  # fmt: skip
            for tid, t in teachers.items()
        },
    }


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}: cache has {x!r}, recipe gives {y!r}")
    return out


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """(S, C, h, w) float -> int8 values and float16 scales (S, C): x ~ q * scale, |error| <= scale / 2.

    The scale is rounded up to float16 (so max |x| / scale <= 127 still holds): 2 bytes per channel
    keep int8 storage near 25% of float32 even for small maps."""
    x = x.contiguous()  # teachers may hand out channels-last or permuted views (timm's SAM does)
    amax = x.abs().amax(dim=(2, 3)).float().clamp_min(1e-8)
    scale = (amax / 127.0 * (1 + 2**-10)).half()  # fp16 rounding moves by at most 2^-11: never below amax / 127
    q = torch.round(x.float() / scale.float()[:, :, None, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def _atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    tmp = path.with_suffix(".partial")
    save_file(tensors, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        return self.root / f"view{view}" / f"shard{shard:05d}.safetensors"


def build_cache(recipe: Recipe, out: Path, views: int = 1, augment: bool = False, dtype: str = "fp16",
                shard_size: int = 256, batch_size: int = 16) -> Path:  # fmt: skip
    """Compute and store every teacher's output for the recipe's training split (resumable, N processes)."""
    from accelerate import PartialState
    from accelerate.utils import set_seed

    from ..data import DatasetSpec, build_dataset
    from .build import build_teachers, teacher_dtype

    if dtype not in ("fp16", "int8"):
        raise ValueError(f"cache dtype must be fp16 or int8, got {dtype!r}")
    state = PartialState(cpu=not torch.cuda.is_available())
    set_seed(recipe.run.seed)  # as the trainer does before building teachers (matters for random weights)
    teachers = build_teachers(recipe, state.device)
    ident = identity(recipe, teachers, views, augment, dtype)
    d = recipe.data
    spec = DatasetSpec(root=d.root, split=d.split, image_size=d.image_size, tasks=(), train=augment,
                       seed=recipe.run.seed, subset=d.subset)  # fmt: skip
    dataset = build_dataset(d.name, spec, d.options)
    plan = CachePlan(out, len(dataset), shard_size, views)
    manifest_path = out / "manifest.json"
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if manifest_path.exists():
            old = json.loads(manifest_path.read_text())
            if old["identity"] != ident:
                raise CacheError(f"{out} holds a different cache: " + "; ".join(_diff(old["identity"], ident)))
    state.wait_for_everyone()
    mine = [s for i, s in enumerate(plan.shards()) if i % state.num_processes == state.process_index]
    tdtype = teacher_dtype(recipe)
    for view, shard in tqdm(mine, desc="cache shards", disable=not state.is_main_process):
        path = plan.path(view, shard)
        if path.exists():
            continue  # finished by an earlier (interrupted) build
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset.set_epoch(view)
        indices = list(range(shard * shard_size, min((shard + 1) * shard_size, len(dataset))))
        stored: dict[str, list[Tensor]] = {}
        for start in range(0, len(indices), batch_size):
            images = torch.stack([dataset[i]["image"] for i in indices[start : start + batch_size]]).to(state.device)
            for tid, teacher in teachers.items():
                for level, feat in enumerate(teacher.encode(images, tdtype).levels):
                    stored.setdefault(f"{tid}/{level}", []).append(feat.cpu())
        tensors = {}
        for key, parts in stored.items():
            feats = torch.cat(parts)
            if dtype == "fp16":
                tensors[key] = feats.half().contiguous()
            else:
                tensors[key], tensors[f"{key}/scale"] = quantize(feats)
        _atomic_save(tensors, path)
    state.wait_for_everyone()
    if state.is_main_process:
        shards = {f"view{v}/shard{k:05d}": sha256_of(plan.path(v, k)) for v, k in plan.shards()}
        shapes = {tid: [list(s) for s in t.level_shapes()] for tid, t in teachers.items()}
        level_dims = {tid: list(t.level_dims) for tid, t in teachers.items()}
        manifest = {"identity": ident, "samples": len(dataset), "shard_size": shard_size, "shards": shards,
                    "shapes": shapes, "level_dims": level_dims}  # fmt: skip
        tmp = manifest_path.with_suffix(".partial")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, manifest_path)
    state.wait_for_everyone()
    return out


class FeatureCache:
    """Memory-mapped reader. The training loader reads each sample's rows in its workers (`rows`), the
    training process widens a collated batch on the device (`targets`); `lookup` does both at once."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            raise CacheError(f"{self.root} is not a complete teacher-feature cache (no manifest.json); "
                             "build it with `sak cache build RECIPE --out DIR`")  # fmt: skip
        self.manifest = json.loads(manifest.read_text())
        ident = self.manifest["identity"]
        self.views, self.augment, self.shard_size = ident["views"], ident["augment"], self.manifest["shard_size"]
        self.teachers = list(self.manifest["level_dims"])
        self.dtype = ident["dtype"]
        self._open: dict[str, object] = {}
        self._verified: set[str] = set()

    def __getstate__(self) -> dict:
        """Open shard handles stay in their process; a DataLoader worker opens its own (verified shards
        are not hashed again)."""
        return {**self.__dict__, "_open": {}}

    def check(self, expected_identity: dict) -> None:
        """Refuse a cache built for other teachers or data, naming every field that differs."""
        built = self.manifest["identity"]
        if built != expected_identity:
            raise CacheError(f"stale cache {self.root}: " + "; ".join(_diff(built, expected_identity)))

    def verify_all(self) -> None:
        """Check every shard's sha256 now, once: DataLoader workers are rebuilt every epoch and would
        otherwise hash each shard again in every worker."""
        for name in self.manifest["shards"]:
            view, shard = name.split("/")
            self._file(int(view.removeprefix("view")), int(shard.removeprefix("shard")))

    def _file(self, view: int, shard: int):
        name = f"view{view}/shard{shard:05d}"
        if name not in self._open:
            path = self.root / f"{name}.safetensors"
            expected = self.manifest["shards"].get(name)
            if expected is None or not path.is_file():
                raise CacheError(f"cache {self.root}: shard {name} is missing")
            if name not in self._verified:
                if sha256_of(path) != expected:
                    raise CacheError(f"cache {self.root}: shard {name} is corrupt (sha256 differs from the manifest)")
                self._verified.add(name)
            self._open[name] = safe_open(str(path), framework="pt")
        return self._open[name]

    def rows(self, index: int, epoch: int) -> dict[str, Tensor]:
        """Sample `index`'s cached maps for the view epoch `epoch` trains on, in their stored dtype:
        "<teacher>/<level>" (C, h, w) fp16 or int8, and for int8 "<teacher>/<level>/scale" (C,) fp16."""
        shard, row = divmod(int(index), self.shard_size)
        f = self._file(epoch % self.views, shard)
        out = {}
        for tid, dims in self.manifest["level_dims"].items():
            for level in range(len(dims)):
                key = f"{tid}/{level}"
                out[key] = f.get_slice(key)[row : row + 1][0]
                if self.dtype == "int8":
                    out[f"{key}/scale"] = f.get_slice(f"{key}/scale")[row : row + 1][0]
        return out

    def targets(self, rows: dict[str, Tensor], device: torch.device | str = "cpu") -> dict[str, TeacherOutput]:
        """A collated batch of `rows` -> float32 teacher outputs on `device`. The stored dtype crosses to
        the device as it is (half, or a quarter, of the float32 bytes) and is widened / dequantised there."""
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
        """`targets` of the collated `rows` of samples `indices` (page-locked on a GPU machine)."""
        batch = default_collate([self.rows(i, epoch) for i in indices])
        if torch.device(device).type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return self.targets(batch, device)

    def level_dims(self) -> dict[str, tuple[int, ...]]:
        return {t: tuple(d) for t, d in self.manifest["level_dims"].items()}


def cache_digest(root: Path) -> str:
    """A short id of a cache's manifest (for logs)."""
    return hashlib.sha256((Path(root) / "manifest.json").read_bytes()).hexdigest()[:12]
