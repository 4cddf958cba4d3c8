"""What a cache directory holds and how its files are written: the manifest, the shards (sha256 beside each,
written atomically), int8 quantisation, and `describe` for `sak cache info`."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ...digest import sha256_files
from ...files import save_safetensors, writing

# 2: teachers' options and metadata, sample count and ids in the identity; float32 int8 scales
# 3: the data's content digests (an image replaced under its name), teachers' channels-last and compile
FORMAT = 3


CONTENT_PREFIX = 16  # hex digits of each content digest the manifest keeps, to name the files that changed


REBUILD = "rebuild it with `sak cache build RECIPE [overrides] --out DIR` into a new directory (or delete {root} first)"


class CacheError(RuntimeError):
    """A cache that does not match the recipe, or whose files are damaged."""


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
    # amax / 127 rounded up near float32's largest value, where 127 * scale (a +-127 read back) overflows to inf
    scale = torch.where(torch.isinf(127 * scale), torch.nextafter(scale, torch.zeros_like(scale)), scale)
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
    with writing(path):
        save_safetensors(tensors, tmp, metadata)  # (readable as the umask allows, not 0600)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _write_digest(digest_path(path), sha256_files([tmp])[0])
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_digest(sidecar: Path, digest: str) -> None:
    """A shard's sha256 file, replaced whole (a crash leaves the old file or the new one, never a torn one)."""
    tmp = sidecar.with_suffix(".partial-sha256")
    tmp.write_text(digest)
    os.replace(tmp, sidecar)


def digest_path(shard: Path) -> Path:
    return shard.with_suffix(".sha256")


def _write_manifest(manifest: dict, path: Path) -> None:
    """Written as the shards are: to a temporary name, synced, renamed, the rename synced."""
    tmp = path.with_suffix(".partial")
    with writing(path), open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    with writing(path):
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


def check_manifest(manifest: dict, path: Path) -> None:
    """Refuse a manifest that lacks what reading or describing the cache needs, or holds it of the wrong kind (one
    edited by hand, or written by another program): a CacheError naming the file and the fields, not a TypeError
    from the arithmetic on them."""
    ident = manifest["identity"]
    missing = [k for k in ("shards", "samples", "shard_size", "level_dims") if k not in manifest]
    missing += [f"identity.{k}" for k in ("views", "augment", "dtype") if k not in ident]
    if missing:
        raise CacheError(f"{path} is not a valid cache manifest (it lacks {', '.join(missing)}); "
                         f"{REBUILD.format(root=path.parent)}")  # fmt: skip

    def count(value, least: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    wrong = [f"{where} {value!r} (a whole number >= {least})"
             for where, value, least in (("samples", manifest["samples"], 0), ("shard_size", manifest["shard_size"], 1),
                                         ("identity.views", ident["views"], 1)) if not count(value, least)]  # fmt: skip
    if not isinstance(manifest["shards"], dict):
        wrong.append(f"shards of type {type(manifest['shards']).__name__} (a mapping of shard name to sha256)")
    if not isinstance(manifest["level_dims"], dict):
        wrong.append(f"level_dims of type {type(manifest['level_dims']).__name__} (a mapping of teacher to widths)")
    if ident["dtype"] not in ("fp16", "int8"):
        wrong.append(f"identity.dtype {ident['dtype']!r} (fp16 or int8)")
    if not wrong and ident["views"] * -(-manifest["samples"] // manifest["shard_size"]) > MAX_SHARDS:
        wrong.append(f"samples {manifest['samples']} in shards of {manifest['shard_size']}, {ident['views']} "
                     f"view(s): more than {MAX_SHARDS} shards (a plan of them would fill the memory)")  # fmt: skip
    for key in ("teachers", "data"):  # (what `sak cache info` describes: an AttributeError for a list)
        if not isinstance(ident.get(key, {}), dict):
            wrong.append(f"identity.{key} of type {type(ident[key]).__name__} (a mapping)")
    if wrong:
        raise CacheError(
            f"{path} is not a valid cache manifest: {'; '.join(wrong)}; {REBUILD.format(root=path.parent)}"
        )


MAX_SHARDS = 1_000_000  # far above any real cache's (ImageNet-1k: 5,005 shards of 256 a view)


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


def bytes_per_sample(shapes: dict[str, list], dtype: str) -> int:
    """Stored bytes of one sample's maps: (C, h, w) per teacher and level, 2 bytes a value in fp16, 1 in int8
    plus a float32 scale per channel (the shards' safetensors headers come on top, a few KB each)."""
    levels = [shape for per_teacher in shapes.values() for shape in per_teacher]
    if dtype == "fp16":
        return sum(2 * c * h * w for c, h, w in levels)
    return sum(c * h * w + 4 * c for c, h, w in levels)


def describe(root: Path) -> list[str]:
    """What a cache directory holds, in lines for `sak cache info`: its state, layout and size, the teachers
    and data it was built for (a finished or an unfinished build)."""
    root = Path(root)
    if not (root / "manifest.json").is_file():
        what = "no manifest.json" if root.is_dir() else "a file" if root.exists() else "there is no such folder"
        raise CacheError(f"{root} is not a teacher-feature cache ({what})")
    manifest = load_manifest(root / "manifest.json")
    check_manifest(manifest, root / "manifest.json")
    ident, shards = manifest["identity"], manifest["shards"]
    views, samples, size = ident["views"], manifest["samples"], manifest["shard_size"]
    plan = CachePlan(root, samples, size, views)
    planned = plan.shards()
    written = [(p, k) for p, k in ((plan.path(v, k), k) for v, k in planned) if p.is_file()]
    mib = sum(p.stat().st_size for p, _ in written) / 2**20
    rows = sum(min(size, samples - k * size) for _, k in written)  # the samples (of a view) in the written shards
    if manifest.get("status", "complete") == "complete":
        gone = [shard_name(v, k) for v, k in planned if not plan.path(v, k).is_file()]
        state = f"complete, {len(shards)} shards" + (
            f", but {len(gone)} of their files are gone ({', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''}): "
            "training refuses it; run its `sak cache build` again to write them anew"
            if gone
            else ""
        )
    else:
        state = f"unfinished build, {len(written)} of {len(planned)} shards written"
    kind = f"{views} augmented view(s)" if ident.get("augment") else "un-augmented images"
    lines = [
        f"cache {root} (format {ident.get('format')}): {state}",
        f"  {ident.get('dtype')}, {kind}, {samples} samples in shards of {size}, {mib:.1f} MiB on disk"
        + (f" ({mib / rows:.3g} MiB per sample and view)" if rows else ""),
        f"  teachers ({ident.get('teacher_precision')}{', compiled' if ident.get('compile_teachers') else ''}"
        + (f" ({ident['compile_mode']})" if "compile_mode" in ident else "")
        + "):",
    ]
    shapes = manifest.get("shapes", {})
    for tid, t in ident.get("teachers", {}).items():
        t = t if isinstance(t, dict) else {}  # (described as far as it goes: the manifest may be edited by hand)
        maps = shapes.get(tid, []) if isinstance(shapes, dict) else []
        maps = ", ".join("x".join(map(str, shape)) if isinstance(shape, list) else str(shape) for shape in maps)
        weights = f"{t.get('weights')}" + (f" (sha256 {str(t['sha256'])[:12]})" if t.get("sha256") else "")
        # (resize keep: the images at their own size, cut to the patch; input_size is then the model's native one)
        keep = f"the images' own size cut to a multiple of {t.get('patch_size')}"
        size = keep if t.get("resize") == "keep" else f"{t.get('input_size')} px"
        lines.append(f"    {tid}: {t.get('name')} from {t.get('source')}, weights {weights}, input {size}, "
                     f"levels {t.get('levels')}: maps {maps}")  # fmt: skip
    d = ident.get("data", {})
    content = d.get("content_sha256")
    lines += [
        f"  data: {d.get('name')} at {d.get('root')}, split {d.get('split')}, image size {d.get('image_size')}, "
        f"subset {d.get('subset')}, "
        + (f"seed {d['seed']}" if "seed" in d else "any seed (it changes none of these features)")
        + f", options {d.get('options')}"
        + (f", tasks {d['tasks']}" if "tasks" in d else ""),
        f"  ids sha256 {str(d.get('ids_sha256'))[:16]}, content sha256 "
        + (str(content)[:16] if content else "none (generated data, or a dataset without content_digests)"),
    ]
    return lines


def cache_digest(root: Path) -> str:
    """A short id of a cache's manifest (for logs)."""
    return hashlib.sha256((Path(root) / "manifest.json").read_bytes()).hexdigest()[:12]
