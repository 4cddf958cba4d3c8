"""Unlabelled images for stage 1 (distillation only): a folder tree ("image_folder", an ImageNet-style
class tree works as is, the class is ignored) or tar shards ("image_tar", read member by member without
unpacking). Also the image decoding and the `DataError` that every `sak` dataset raises for bad files.

Training samples are a RandomResizedCrop (area share `scale`, aspect `ratio`, torchvision's algorithm)
plus a horizontal flip, drawn from `sample_rng(index)`; evaluation samples are the centred square
(`eval_crop` of the short side) resized to `spec.image_size`. Samples: {"image": uint8 (3, S, S), "id"}.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..files import refuse_special_file
from ..registry import DATASETS
from .base import DatasetSpec, SakDataset, apply_subset, file_digests, repeated
from .transforms import center_crop_box, random_resized_crop_box, resized_crop

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


class DataError(ValueError):
    """A bad file in a dataset; the message names the file and what is wrong with it."""


# Full scale of the high-bit-depth modes that Pillow's convert("RGB") would clip at 255 instead of rescaling.
# Mode "I" (32-bit signed) is what Pillow uses for 16-bit PNG / TIFF data, so it is read as 16-bit too;
# "F" (32-bit float) follows the float-image convention of [0, 1].
HIGH_BIT_DEPTH_SCALE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}
# Transparent pixels are composited onto white, what image viewers and browsers show behind them; the
# colour stored under alpha 0 is arbitrary (often black, sometimes leftover content) and never shown.
ALPHA_BACKGROUND = (255, 255, 255)


def to_rgb(im: Image.Image, exif: bool = True) -> np.ndarray:
    """A decoded PIL image -> uint8 (H, W, 3) RGB, as the image is displayed.

    - EXIF orientation applied (a phone photo stored sideways comes out upright), unless `exif` is False;
    - 16-bit and 32-bit modes rescaled to 8 bits (`HIGH_BIT_DEPTH_SCALE`: I;16* and I from [0, 65535],
      F from [0, 1], out-of-range values clipped) rather than clipped at 255 as `convert("RGB")` does;
    - transparency (RGBA, LA, PA, a palette or colour key) composited onto white (`ALPHA_BACKGROUND`);
    - grey, palette and CMYK converted as Pillow does.
    """
    if exif:
        im = ImageOps.exif_transpose(im)
    scale = HIGH_BIT_DEPTH_SCALE.get(im.mode)
    if scale is not None:
        grey = np.nan_to_num(np.asarray(im, dtype=np.float64))  # (H, W): these modes are single-channel
        grey = np.clip(np.rint(grey * (255.0 / scale)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if im.has_transparency_data:
        background = Image.new("RGBA", im.size, (*ALPHA_BACKGROUND, 255))
        im = Image.alpha_composite(background, im.convert("RGBA"))
    return np.array(im.convert("RGB"))


def decode_rgb(source: str | os.PathLike | bytes, where: str | None = None, exif: bool = True) -> np.ndarray:
    """An image file (path) or its bytes -> uint8 (H, W, 3) RGB, as displayed (see `to_rgb`: EXIF
    orientation, 16/32-bit rescaled to 8 bits, transparency on white). Every `sak` reader of image files
    decodes through here. `exif=False` leaves the pixels as stored: the labelled datasets' label maps are
    stored unrotated, and their reference loaders (PIL's `convert("RGB")`) ignore the EXIF orientation.

    Raises:
        DataError: a missing or undecodable file, named by `where` (default: the path).
    """
    where = where or str(source)
    try:
        if not isinstance(source, bytes):
            refuse_special_file(source)
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return to_rgb(im, exif)
    except FileNotFoundError as exc:
        raise DataError(f"{where}: file not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{where}: cannot decode the image ({exc})") from exc
    except Image.DecompressionBombError as exc:  # (an Exception of its own: it escaped skip_bad and verify)
        raise DataError(
            f"{where}: {exc} Pillow refuses images this large; raise PIL.Image.MAX_IMAGE_PIXELS if it is meant"
        ) from exc


def list_image_files(
    folder: str | os.PathLike, extensions: tuple[str, ...] = IMAGE_EXTENSIONS, follow_links: bool = True
) -> dict[str, str]:
    """Every file under `folder` (recursive) whose name ends in one of `extensions` (case-insensitive):
    id -> path relative to `folder`, sorted by path. The id is the relative path without extension, with
    "/" separators ("n01440764/n01440764_10026"). `image_folder` and `sak select` both list folders here,
    so their ids agree.

    Linked folders are followed after the real ones: a folder reached a second time (a link to a folder of
    the tree, or above it, or a second link to one folder) is listed once, under its real path where it has
    one in the tree, else under the first link to it (in sorted order).

    Raises:
        ValueError: two files whose paths differ only by extension (they would share an id).
    """
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    files, seen, links = [], set(), [str(folder)]
    while links:  # the folder itself, then (following links) each linked folder not listed yet, in walk order
        for dirpath, dirnames, filenames in os.walk(links.pop(0)):  # (os.walk follows the top's own link)
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:  # reached again: a loop, or a second link to one folder
                dirnames.clear()
                continue
            seen.add((st.st_dev, st.st_ino))
            dirnames.sort()
            if follow_links:
                links += [os.path.join(dirpath, d) for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            files.extend(os.path.join(dirpath, f) for f in filenames if f.lower().endswith(exts))
    by_id: dict[str, str] = {}
    for rel in sorted(os.path.relpath(f, folder) for f in files):
        image_id = os.path.splitext(rel)[0].replace(os.sep, "/")
        if image_id in by_id:
            raise ValueError(
                f"{str(folder)!r}: {by_id[image_id]} and {rel} both have id {image_id!r} "
                "(they differ only by extension); ids must be unique"
            )
        by_id[image_id] = rel
    return by_id


def _check_range(name: str, values: list[float], low: float, high: float) -> tuple[float, float]:
    if len(values) != 2 or not (low <= values[0] <= values[1] <= high):
        raise ValueError(f"data.options.{name} must be [min, max] with {low} <= min <= max <= {high}, got {values}")
    return float(values[0]), float(values[1])


class UnlabelledImages(SakDataset):
    """Shared crop / flip / bad-file handling; subclasses list `self.ids` and implement `read(index)`."""

    supported_tasks = ()
    train_only_options = ("scale", "ratio", "flip")
    eval_only_options = ("eval_crop",)

    @dataclass
    class Options:
        scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area share
        ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # RandomResizedCrop aspect
        flip: bool = True
        eval_crop: float = 1.0  # evaluation: centre square of this share of the short side
        skip_bad: bool = False  # a bad image is logged and replaced by the next good one

    def __init__(self, spec: DatasetSpec, options) -> None:
        super().__init__(spec, options)
        self.scale = _check_range("scale", options.scale, 1e-6, 1.0)
        self.ratio = _check_range("ratio", options.ratio, 1e-3, 1e3)
        if not 0 < options.eval_crop <= 1:
            raise ValueError(f"data.options.eval_crop must be in (0, 1], got {options.eval_crop}")
        self.ids: list[str] = []
        self.skipped: list[tuple[str, str]] = []  # (id, problem) of the bad images met in this process

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, index: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _crop(self, image: np.ndarray, index: int) -> torch.Tensor:
        h, w = image.shape[:2]
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        if not self.spec.train:
            return resized_crop(tensor, center_crop_box(h, w, self.options.eval_crop), self.spec.image_size)
        rng = self.sample_rng(index)
        out = resized_crop(tensor, random_resized_crop_box(h, w, rng, self.scale, self.ratio), self.spec.image_size)
        if self.options.flip and rng.random() < 0.5:
            out = out.flip(-1)
        return out

    def __getitem__(self, index: int) -> dict:
        source, tries = index, min(len(self.ids), 100)
        for _ in range(tries):
            try:
                image = self.read(source)
                return {"image": self._crop(image, index), "id": self.ids[source]}
            except DataError as exc:
                if not self.options.skip_bad:
                    raise
                if (self.ids[source], str(exc)) not in self.skipped:  # (once, not again every epoch)
                    self.skipped.append((self.ids[source], str(exc)))
                log.warning("skipping a bad image (data.options.skip_bad): %s", exc)
                source = (source + 1) % len(self.ids)
        raise DataError(f"{type(self).__name__}: no readable image among {tries} tried from index {index}")


def _split_root(spec: DatasetSpec, split_subdir: bool) -> Path:
    if spec.root is None:
        raise ValueError("data.root must name the image folder")
    root = Path(spec.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {str(root)!r} is not a directory")
    if not split_subdir:
        return root
    folder = root / spec.split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no folder {str(folder)!r} for split {spec.split!r}; the folders under data.root are "
            f"{sorted(p.name for p in root.iterdir() if p.is_dir())[:10]}. "
            "Set data.options.split_subdir: false to read every image under data.root instead."
        )
    return folder


@DATASETS.register("image_folder")
class ImageFolder(UnlabelledImages):
    """Every image under `root/<split>` (or `root` with `split_subdir: false`), recursively, sorted by
    relative path. Ids are the relative paths without extension ("n01440764/n01440764_10026")."""

    @dataclass
    class Options(UnlabelledImages.Options):
        split_subdir: bool = True
        extensions: list[str] = field(default_factory=lambda: list(IMAGE_EXTENSIONS))
        follow_links: bool = True

    def __init__(self, spec: DatasetSpec, options: Options) -> None:
        super().__init__(spec, options)
        self.folder = _split_root(spec, options.split_subdir)
        by_id = list_image_files(self.folder, tuple(options.extensions), options.follow_links)
        if not by_id:
            exts = ", ".join(options.extensions)
            raise FileNotFoundError(f"no image files ({exts}) under {str(self.folder)!r}")
        self.ids = apply_subset(list(by_id), spec.subset, spec)
        self.files = [by_id[i] for i in self.ids]

    def read(self, index: int) -> np.ndarray:
        return decode_rgb(self.folder / self.files[index])

    def content_digests(self) -> list[tuple[str, str]]:
        return file_digests(self.folder / f for f in self.files)


# ---------------------------------------------------------------------------------------------
# tar shards
# ---------------------------------------------------------------------------------------------
def index_tar(path: str) -> list[tuple[str, int, int]]:
    """(member name, data offset, size) of every regular image member, in archive order. Reading the
    headers seeks past the data, so this costs one small read per member, not the archive's size."""
    members = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                if m.isfile() and m.name.lower().endswith(IMAGE_EXTENSIONS):
                    members.append((m.name, m.offset_data, m.size))
    except tarfile.ReadError as exc:
        with open(path, "rb") as f:
            head = f.read(6)
        if head.startswith(COMPRESSED_MAGIC):
            raise DataError(
                f"{path}: a compressed tar ({exc}); compressed shards cannot be read member by member, "
                "decompress them first (e.g. `gunzip`) or unpack them and use image_folder"
            ) from exc
        raise DataError(f"{path}: not a readable tar ({exc}): cut short (an interrupted copy) or damaged") from exc
    return members


# gzip, bzip2, xz and zstd: what a shard that tarfile's "r:" cannot read but is whole usually is
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")


def _read_index(cache: Path, path: str) -> list[tuple[str, int, int]] | None:
    """A kept member index, or None (and a warning) when it is not one that fits the shard: a file damaged or
    edited by hand was trusted, as a JSON error naming no file or members read out of the shard's bytes."""
    size = os.path.getsize(path)
    try:
        members = [tuple(m) for m in json.loads(cache.read_text())]
        if all(
            len(m) == 3 and isinstance(m[0], str) and all(type(v) is int and v >= 0 for v in m[1:])
            and m[1] + m[2] <= size for m in members
        ):  # fmt: skip
            return members
    except (ValueError, TypeError, OSError):
        pass
    log.warning("%s: not a member index of %s; indexing the shard again", cache, path)
    return None


def _cached_index(path: str, cache_dir: str | None) -> list[tuple[str, int, int]]:
    if cache_dir is None:
        return index_tar(path)
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
    cache = Path(cache_dir) / f"{Path(path).name}.{key}.json"
    if cache.is_file() and (kept := _read_index(cache, path)) is not None:
        return kept
    members = index_tar(path)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(members))
    os.replace(tmp, cache)  # atomic: processes indexing the same shard at once do not clash
    return members


@DATASETS.register("image_tar")
class ImageTar(UnlabelledImages):
    """Images inside uncompressed tar shards matched by `shards` (a glob relative to `root`; "{split}" is
    replaced by the split). The member index (offsets) is built once at start-up (or read from
    `index_cache`); each item is one positioned read, so nothing is unpacked or held in memory. Ids are
    "<shard stem>/<member path without extension>"."""

    OPEN_SHARDS = 64  # descriptors kept open per process, the most recently read shards'
    # where the member indexes are kept changes no sample
    train_only_options = (*UnlabelledImages.train_only_options, "index_cache")
    eval_only_options = (*UnlabelledImages.eval_only_options, "index_cache")

    @dataclass
    class Options(UnlabelledImages.Options):
        shards: str = "{split}*.tar"
        index_cache: str | None = None  # folder for per-shard member indexes (keyed by path, size, mtime)

    def __init__(self, spec: DatasetSpec, options: Options) -> None:
        super().__init__(spec, options)
        if spec.root is None:
            raise ValueError("data.root must name the folder holding the tar shards")
        pattern = os.path.join(spec.root, options.shards.replace("{split}", spec.split))
        self.shards = sorted(glob.glob(pattern))
        if not self.shards:
            raise FileNotFoundError(f"no tar shards match {pattern!r} (data.root + data.options.shards)")
        ids, locations, names = [], [], []
        for s, shard in enumerate(self.shards):
            stem = Path(shard).name.removesuffix(".tar")
            for name, offset, size in _cached_index(shard, options.index_cache):
                ids.append(f"{stem}/{os.path.splitext(name)[0]}")
                locations.append((s, offset, size))
                names.append(name)
        if not ids:
            raise FileNotFoundError(f"the shards matching {pattern!r} hold no image members")
        where = {i: k for k, i in enumerate(ids)}
        if len(where) != len(ids):  # (one member was read for every copy of its id, the others never)
            twice = repeated(ids)
            members = [f"{self.shards[locations[k][0]]}:{names[k]}" for k, i in enumerate(ids) if i == twice[0]]
            raise ValueError(
                f"{len(twice)} image id(s) name more than one tar member, e.g. {twice[0]!r}: {', '.join(members)}; "
                "an id is <shard file name>/<member path without extension>, so members that differ only by "
                "extension, or shards of one name in two folders, must be renamed"
            )
        self.ids = apply_subset(ids, spec.subset, spec)
        self.locations = np.asarray([locations[where[i]] for i in self.ids], dtype=np.int64)  # (N, 3)
        self._fds: collections.OrderedDict[int, int] = collections.OrderedDict()  # shard -> fd, least recent first
        self._pid = os.getpid()

    def __getstate__(self) -> dict:  # file descriptors do not travel to worker processes
        return {**self.__dict__, "_fds": collections.OrderedDict()}

    def _fd(self, shard: int) -> int:
        """The shard's descriptor, at most OPEN_SHARDS kept open (one per shard ran out of the usual limit of
        1024 descriptors with ImageNet's 1024+ shards)."""
        if self._pid != os.getpid():  # a forked worker: the parent's descriptors share one file position
            self._close_all()  # (the worker's copies: the parent's own stay open)
            self._pid = os.getpid()
        if shard in self._fds:
            self._fds.move_to_end(shard)
        else:
            if len(self._fds) >= self.OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
            self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return self._fds[shard]

    def _close_all(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def content_digests(self) -> list[tuple[str, str]]:
        """Of the whole shards used (one digest per shard, not per member)."""
        return file_digests(self.shards[s] for s in np.unique(self.locations[:, 0]))

    def read(self, index: int) -> np.ndarray:
        shard, offset, size = (int(v) for v in self.locations[index])
        data = os.pread(self._fd(shard), size, offset)
        where = f"{self.shards[shard]}:{self.ids[index].split('/', 1)[1]}"
        if len(data) != size:
            raise DataError(f"{where}: truncated shard (read {len(data)} of {size} bytes)")
        return decode_rgb(data, where)

    def __del__(self) -> None:
        if hasattr(self, "_fds"):
            self._close_all()
