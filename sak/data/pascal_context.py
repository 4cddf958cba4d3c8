"""PASCAL-Context in the multi-task layout ("PASCAL_MT") that every multi-task repository reads, and the
machinery shared with NYUD-v2 (`MultiTaskDataset`).

Layout under `root` (see docs/datasets.md):
    JPEGImages/<id>.jpg                 RGB photographs
    ImageSets/Context/{train,val}.txt   the split ids (4998 / 5105)
    semseg/pascal-context/<id>.png      21 classes (background + 20 VOC), 255 ignore (semseg/VOC12 first if present)
    human_parts/<id>.mat                Pascal-Part `anno` struct: objects(class, class_ind, mask, parts(part_name, mask))
    sal_distill/<id>.png                saliency 0-255, binarised at 0.5
    normals_distill/<id>.png            RGB, n = 2 v / 255 - 1
    pascal-context/trainval/<id>.mat    `LabelMap`: the 459-class context labels (edges, normals validity)
    json/{context_classes,nyu_classes,pascal_part}.json   class lists

Targets, as the public loaders (ASTMT, MTL-PyTorch, InvPT, SAK) build them:
- parts: the person objects (class_ind 15) of human_parts/<id>.mat that have parts; fine Pascal-Part names
  map to 6 parts (`PERSON_PARTS`), the rest of the image is background 0; after augmentation a sample with
  no part pixel left is all-ignore.
- edges: the Laplacian (3x3 cross kernel, reflect-101 borders, as cv2.Laplacian ksize 1) of the context
  LabelMap is non-zero, then thinned (skimage `thin`), computed at load time: the training target. The
  boundary benchmark (SEISM) scores against another map of the same LabelMap, `seg2bmap` (one-sided);
  `PascalContext.eval_target` gives it to the evaluation.
- normals: kept only on pixels whose context class is also an NYUD class (names in context_classes.json
  that appear in nyu_classes.json, "unknown" excluded, "tvmonitor" added); elsewhere all-zero = ignore.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.io
import torch
from PIL import Image
from scipy import ndimage
from skimage.morphology import thin

from ..metrics.boundary import seg2bmap
from ..registry import DATASETS
from .base import IGNORE_INDEX, DatasetSpec, SakDataset, apply_subset, file_digests
from .images import DataError, decode_rgb
from .transforms import (
    BLACK,
    IMAGENET_MEAN_UINT8,
    DenseAugment,
    dense_eval_transform,
    dense_train_transform,
    to_tensors,
)

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
PERSON_CLASS_IND = 15  # Pascal-Part / VOC index of "person"
HUMAN_PARTS = ("background", "head", "torso", "upper arm", "lower arm", "upper leg", "lower leg")
# Fine Pascal-Part person part names -> the 6 coarse parts (index into HUMAN_PARTS).
PERSON_PARTS = {
    **dict.fromkeys(["head", "hair", "lear", "rear", "lebrow", "rebrow", "leye", "reye", "nose", "mouth"], 1),
    **dict.fromkeys(["torso", "neck"], 2),
    **dict.fromkeys(["luarm", "ruarm"], 3),
    **dict.fromkeys(["llarm", "rlarm", "lhand", "rhand"], 4),
    **dict.fromkeys(["luleg", "ruleg"], 5),
    **dict.fromkeys(["llleg", "rlleg", "lfoot", "rfoot"], 6),
}
# (folder, suffix) of each task's file; edges come from pascal-context/trainval/<id>.mat.
TASK_FILES = {
    "semseg": ("semseg/pascal-context", ".png"),
    "parts": ("human_parts", ".mat"),
    "saliency": ("sal_distill", ".png"),
    "normals": ("normals_distill", ".png"),
    "edges": ("pascal-context/trainval", ".mat"),
}
LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# readers: path -> numpy, a DataError naming the file for anything wrong
# ---------------------------------------------------------------------------------------------
def read_png(path: Path, channels: int) -> np.ndarray:
    """A PNG as stored (palette indices, grey or RGB values), checked for the number of channels."""
    try:
        with Image.open(path) as im:
            array = np.array(im)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # (the last: no OSError)
        raise DataError(f"{path}: cannot decode the PNG ({exc})") from exc
    got = 1 if array.ndim == 2 else array.shape[2]
    if got != channels:
        raise DataError(f"{path}: expected a {channels}-channel image, got shape {array.shape}")
    return array


_WARNED_ZERO_ONE: set[Path] = set()  # folders whose 0/1 8-bit maps read_fraction has warned of


def read_fraction(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A grey PNG target (saliency, edges) as float32 in [0, 1]: 8-bit v / 255 (the releases'), 16-bit
    v / 65535 (it read as up to 257), 1-bit as 0/1 (Pillow gives it as bool, which / 255 read as 0.004). An
    8-bit PNG of 0/1 values reads as v / 255 too, with a warning (once per folder and process): it is almost
    always a 0/1 mask saved as 8 bits, which would read as an empty map."""
    array = check_shape(path, read_png(path, 1), shape)
    if array.dtype == bool:
        return array.astype(np.float32)
    if array.dtype == np.uint8:
        if array.max(initial=0) == 1 and path.parent not in _WARNED_ZERO_ONE:
            _WARNED_ZERO_ONE.add(path.parent)
            warnings.warn(
                f"{path}: an 8-bit map whose values are all 0 or 1, read as 0 and 1/255 (8-bit maps are v / 255, "
                "as the releases' 0/255 maps); if it is a 0/1 mask, save it as 0/255 or as a 1-bit PNG (further "
                f"such files in {path.parent} are not named)",
                RuntimeWarning,
                stacklevel=2,
            )
        return array.astype(np.float32) / 255.0
    if array.dtype in (np.uint16, np.int32) and array.min(initial=0) >= 0 and array.max(initial=0) <= 65535:
        return array.astype(np.float32) / 65535.0  # (Pillow gives 16-bit grey as I;16 or I)
    raise DataError(f"{path}: expected an 8-bit (or 1- or 16-bit) grey PNG, got values of type {array.dtype}")


def load_mat(path: Path, key: str) -> np.ndarray:
    try:
        mat = scipy.io.loadmat(path)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except Exception as exc:  # scipy raises several unrelated types for corrupt files
        raise DataError(f"{path}: cannot read the .mat file ({type(exc).__name__}: {exc})") from exc
    if key not in mat:
        raise DataError(f"{path}: no variable {key!r} (found {sorted(k for k in mat if not k.startswith('__'))})")
    return mat[key]


def check_shape(path: Path, array: np.ndarray, shape: tuple[int, int], plane: bool = False) -> np.ndarray:
    """`array` if it is `shape` (H, W) large; `plane`: a single (H, W) map (a .mat label, whose variable may hold
    anything: a string read as a 1-D array was an IndexError)."""
    array = np.asarray(array)
    if array.ndim < 2 or (plane and array.ndim != 2):
        raise DataError(f"{path}: an array of shape {array.shape}, expected an (H, W) label map of the image's "
                        f"{shape[0]}x{shape[1]}")  # fmt: skip
    if array.shape[:2] != shape:
        raise DataError(f"{path}: label is {array.shape[0]}x{array.shape[1]}, the image is {shape[0]}x{shape[1]}")
    return array


def check_classes(path: Path, label: np.ndarray, n_classes: int) -> np.ndarray:
    bad = np.unique(label[(label >= n_classes) & (label != IGNORE_INDEX)])
    if bad.size:
        raise DataError(f"{path}: class value(s) {bad[:10].tolist()} out of range; expected 0..{n_classes - 1} or 255")
    return label


def edges_from_label_map(label_map: np.ndarray) -> np.ndarray:
    """The training target: class boundaries of a label map, Laplacian != 0, thinned to one pixel;
    float32 {0, 1}."""
    lap = ndimage.convolve(label_map.astype(np.float64), LAPLACIAN, mode="mirror")
    return thin(np.abs(lap) > 0).astype(np.float32)


def seism_boundaries(label_map: np.ndarray) -> np.ndarray:
    """The boundary ground truth SEISM scores PASCAL-Context against: `seg2bmap(relabel(LabelMap))`
    (db_gt.m, edgesEvalImg.m); float32 {0, 1}. `relabel` (numbering the 4-connected regions) is left out:
    it cannot change seg2bmap, which compares a pixel with its east and south neighbours (4-adjacent: same
    label, same region) and its south-east one (same label but another region only when east and south
    both differ, which marks the pixel already)."""
    return seg2bmap(label_map).astype(np.float32)


def read_human_parts(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) int64: 0 background, 1..6 the parts of every person that has part annotations."""
    anno = load_mat(path, "anno")
    try:
        objects = anno[0, 0]["objects"].ravel()
    except (IndexError, ValueError) as exc:
        raise DataError(f"{path}: `anno` has no `objects` struct array ({exc})") from exc
    target = np.zeros(shape, dtype=np.int64)
    for k, obj in enumerate(objects):
        try:
            class_ind, parts = int(np.asarray(obj["class_ind"]).ravel()[0]), np.asarray(obj["parts"])
        except (ValueError, IndexError) as exc:
            raise DataError(f"{path}: object {k} lacks `class_ind` / `parts` ({exc})") from exc
        if class_ind != PERSON_CLASS_IND or parts.size == 0:
            continue
        for j, part in enumerate(parts.ravel()):
            try:
                name, mask = str(np.asarray(part["part_name"]).ravel()[0]), np.asarray(part["mask"])
            except (ValueError, IndexError, KeyError, TypeError) as exc:
                raise DataError(f"{path}: part {j} of object {k} lacks `part_name` / `mask` ({exc})") from exc
            if name not in PERSON_PARTS:
                raise DataError(f"{path}: unknown person part {name!r}; known: {sorted(PERSON_PARTS)}")
            mask = check_shape(path, mask, shape, plane=True).astype(bool)
            target[mask] = PERSON_PARTS[name]
    return target


def normals_valid_classes(json_dir: Path) -> np.ndarray:
    """Context class indices that carry distilled normals: those named in both class lists (not
    "unknown"), plus "tvmonitor" (named "television" in NYUD), as the reference loaders."""
    lists = {}
    for name in ("context_classes", "nyu_classes"):
        path = json_dir / f"{name}.json"
        try:
            lists[name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot read the class list ({exc})") from exc
    context = lists["context_classes"]
    if not isinstance(context, dict) or "tvmonitor" not in context:
        raise DataError(
            f"{json_dir / 'context_classes.json'}: expected a mapping of class name -> index with 'tvmonitor'"
        )
    valid = [context[n] for n in lists["nyu_classes"] if n in context and n != "unknown"]
    return np.unique(np.asarray([*valid, context["tvmonitor"]], dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# shared machinery of the dense multi-task datasets
# ---------------------------------------------------------------------------------------------
SKIP_BAD_HINT = "data.options.skip_bad: true skips bad samples and lists them"  # (sak eval-preds words its own)


class MultiTaskDataset(SakDataset):
    """Split file -> ids -> per-sample files; raw targets via `load_raw`, then SAK's augmentation
    (training) or centred padding to `eval_size` (evaluation, with the original "size")."""

    eval_size_default: tuple[int, int] = (512, 512)
    # (verify reads every sample once: it changes none; skip_bad drops samples, which changes the ids: checked)
    train_only_options = ("crop_size", "scale_range", "cat_max_ratio", "flip", "photometric", "verify", "skip_bad")
    eval_only_options = ("eval_size", "verify", "skip_bad")
    # 2: float64 rescaling, HSV truncated as OpenCV's and always taken (sak 0.1, 2026-11); 3: a rescaled pixel of
    # k + 0.5 rounded alike on any number of threads (2026-11-29); 4: the rescaled image truncated, not rounded
    augmentation = "dense-4"

    @dataclass
    class Options:
        skip_bad: bool = False  # drop bad samples (checked once at start-up) instead of failing
        verify: bool = False  # read every sample at start-up (implied by skip_bad)
        eval_size: list[int] | None = None  # (H, W) canvas of evaluation samples; None = the dataset's
        crop_size: list[int] | None = None  # (H, W) of training samples; None = image_size square
        scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
        cat_max_ratio: float = 0.75
        flip: bool = True
        photometric: bool = True
        image_pad: Literal["mean", "black"] = "mean"  # ImageNet mean colour (= 0 after normalising) or 0

    def __init__(self, spec: DatasetSpec, options) -> None:
        super().__init__(spec, options)
        if spec.root is None:
            raise ValueError(f"data.root must point at the {type(self).__name__} folder")
        self.root = Path(spec.root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root {str(self.root)!r} is not a directory")
        canvas, image_fill = self.prediction_canvas(spec.image_size, options)
        self.eval_size = canvas
        crop = options.crop_size or [spec.image_size, spec.image_size]
        scales = options.scale_range
        if len(scales) != 2 or not 0 < scales[0] <= scales[1]:
            raise ValueError(
                f"data.options.scale_range {list(scales)}: give [low, high] with 0 < low <= high (SAK's: [0.5, 2.0])"
            )
        self.augment = DenseAugment(
            crop_size=self._size_option("crop_size", crop),
            scale_range=tuple(options.scale_range),
            cat_max_ratio=options.cat_max_ratio,
            flip=options.flip,
            photometric=options.photometric,
            image_fill=image_fill,
        )
        self.skipped: list[tuple[str, str]] = []  # (id, problem) of the samples left out by skip_bad
        self.ids = apply_subset(self._read_split(), spec.subset, spec)
        self.files: dict[str, dict[str, Path]] = {}
        self._find_files(check_contents=options.verify or options.skip_bad)
        self.ids = [i for i in self.ids if i in self.files]
        if self.skipped:
            listing = "\n  ".join(f"{i}: {why}" for i, why in self.skipped)
            log.warning(
                "%s %s: skipped %d bad sample(s):\n  %s", type(self).__name__, spec.split, len(self.skipped), listing
            )
        if not self.ids:
            raise DataError(f"{type(self).__name__}: no usable samples in split {spec.split!r} under {self.root}")

    @classmethod
    def prediction_canvas(cls, image_size: int, options) -> tuple[tuple[int, int], tuple[int, int, int]]:
        """The evaluation canvas (`eval_size`) and the padding colour (`image_pad`)."""
        canvas = cls._size_option("eval_size", list(options.eval_size or cls.eval_size_default))
        return canvas, (IMAGENET_MEAN_UINT8 if options.image_pad == "mean" else BLACK)

    def _find_files(self, check_contents: bool) -> None:
        """Fill `self.files` (id -> its files). Missing files are always checked; contents (every sample
        read once) on request."""
        for i in self.ids:
            paths = self.locate(i)
            missing = list(dict.fromkeys(str(p) for p in paths.values() if not p.is_file()))
            if missing:
                self._bad(i, f"missing file(s): {', '.join(missing)}")
                continue
            self.files[i] = paths
            if check_contents:
                try:
                    self.load_raw(i)
                except DataError as exc:
                    del self.files[i]
                    self._bad(i, str(exc))

    @staticmethod
    def _size_option(name: str, value: list[int]) -> tuple[int, int]:
        if len(value) != 2 or min(value) < 1:
            raise ValueError(f"data.options.{name} must be [height, width] of positive integers, got {value}")
        return int(value[0]), int(value[1])

    def _bad(self, sample_id: str, problem: str) -> None:
        if not self.options.skip_bad:
            raise DataError(f"{type(self).__name__} sample {sample_id!r}: {problem} ({SKIP_BAD_HINT})")
        self.skipped.append((sample_id, problem))

    def _read_split(self) -> list[str]:
        path = self.split_file(self.spec.split)
        if not path.is_file():
            found = sorted(p.stem for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
            raise FileNotFoundError(f"no split file {str(path)!r} for split {self.spec.split!r}; found splits {found}")
        try:  # (utf-8-sig: a byte-order mark made the first id "\ufeff..." and its files "missing")
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc}); the split file lists one id per line") from exc
        ids = [line.strip() for line in text.splitlines() if line.strip()]
        if len(set(ids)) != len(ids):
            raise DataError(f"{path}: repeated ids in the split file")
        return ids

    def split_file(self, split: str) -> Path:  # pragma: no cover - abstract
        raise NotImplementedError

    def locate(self, sample_id: str) -> dict[str, Path]:  # pragma: no cover - abstract
        """The files one sample needs for the requested tasks ("image" included)."""
        raise NotImplementedError

    def load_raw(
        self, sample_id: str, tasks: tuple[str, ...] | None = None
    ) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        """{"image": uint8 (H, W, 3), task: (H, W) / (H, W, 3) target} before augmentation, for `tasks`
        (default: the requested ones)."""
        raise NotImplementedError

    def content_digests(self) -> list[tuple[str, str]]:
        """The images, and the labels of the tasks that shape them (`image_tasks`: semseg in training)."""
        kinds = ("image", *self.image_tasks())
        return file_digests(self.files[i][k] for i in self.ids for k in kinds)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return self._sample(index, self.spec.tasks)

    def image_at(self, index: int) -> torch.Tensor:
        """`self[index]["image"]` without reading the targets that do not shape it (`image_tasks`; the
        augmentation draws the same numbers either way)."""
        return self._sample(index, self.image_tasks())["image"]

    def image_tasks(self) -> tuple[str, ...]:
        """In training, semseg when it is requested: the crop is chosen from its labels (`cat_max_ratio`)."""
        return ("semseg",) if self.spec.train and "semseg" in self.spec.tasks else ()

    def _sample(self, index: int, tasks: tuple[str, ...]) -> dict:
        sample_id = self.ids[index]
        try:
            raw = self.load_raw(sample_id, tasks)
        except DataError as exc:
            raise DataError(f"{type(self).__name__} sample {sample_id!r}: {exc}") from exc
        h, w = raw["image"].shape[:2]
        if self.spec.train:
            out = dense_train_transform(raw, self.sample_rng(index), self.augment)
        else:
            try:
                out = dense_eval_transform(raw, self.eval_size, self.augment.image_fill)
            except ValueError as exc:
                raise DataError(
                    f"{self.files[sample_id]['image']}: {exc}; set data.options.eval_size to a canvas at least as "
                    "large (sak eval-preds: --eval-size H W)"
                ) from exc
        sample = {**to_tensors(out), "id": sample_id}
        if not self.spec.train:  # the original (h, w): unpad(prediction, size) maps back before scoring
            sample["size"] = torch.tensor([h, w], dtype=torch.int64)
        return sample


# ---------------------------------------------------------------------------------------------
# PASCAL-Context
# ---------------------------------------------------------------------------------------------
@DATASETS.register("pascal_context")
class PascalContext(MultiTaskDataset):
    """PASCAL-Context multi-task (semseg 21, parts 7, saliency, normals, edges); eval canvas 512x512."""

    supported_tasks = ("semseg", "parts", "saliency", "normals", "edges")
    task_classes = {"semseg": len(VOC_CLASSES), "parts": len(HUMAN_PARTS)}
    eval_size_default = (512, 512)

    @dataclass
    class Options(MultiTaskDataset.Options):
        pass

    def __init__(self, spec: DatasetSpec, options: Options) -> None:
        self._valid_normals: np.ndarray | None = None
        super().__init__(spec, options)

    def split_file(self, split: str) -> Path:
        return self.root / "ImageSets" / "Context" / f"{split}.txt"

    def locate(self, sample_id: str) -> dict[str, Path]:
        files = {"image": self.root / "JPEGImages" / f"{sample_id}.jpg"}
        for task in self.spec.tasks:
            folder, suffix = TASK_FILES[task]
            files[task] = self.root / folder / f"{sample_id}{suffix}"
        if "semseg" in files:  # the reference loaders prefer VOC12 labels where a release ships them
            voc = self.root / "semseg" / "VOC12" / f"{sample_id}.png"
            files["semseg"] = voc if voc.is_file() else files["semseg"]
        if "edges" in files or "normals" in files:
            files["label_map"] = self.root / "pascal-context" / "trainval" / f"{sample_id}.mat"
        return files

    @property
    def valid_normal_classes(self) -> np.ndarray:
        if self._valid_normals is None:
            self._valid_normals = normals_valid_classes(self.root / "json")
        return self._valid_normals

    def load_raw(self, sample_id: str, tasks: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        tasks = self.spec.tasks if tasks is None else tasks
        files = self.files[sample_id]
        raw = {"image": decode_rgb(files["image"], exif=False)}  # (labels: stored unrotated)
        shape = raw["image"].shape[:2]
        label_map = None
        if "edges" in tasks or "normals" in tasks:
            label_map = check_shape(files["label_map"], load_mat(files["label_map"], "LabelMap"), shape, plane=True)
        for task in tasks:
            path = files[task]
            if task == "semseg":
                raw[task] = check_classes(path, check_shape(path, read_png(path, 1), shape), len(VOC_CLASSES))
            elif task == "parts":
                raw[task] = read_human_parts(path, shape)
            elif task == "saliency":
                raw[task] = (read_fraction(path, shape) > 0.5).astype(np.float32)
            elif task == "normals":
                normals = 2.0 * check_shape(path, read_png(path, 3), shape).astype(np.float32) / 255.0 - 1.0
                raw[task] = normals * np.isin(label_map, self.valid_normal_classes)[..., None]
            elif task == "edges":  # derived from the context labels, nothing else to read
                raw[task] = edges_from_label_map(label_map)
        return raw

    def eval_target(self, sample_id: str, task: str, target: torch.Tensor) -> torch.Tensor:
        """Boundaries are scored against SEISM's ground truth, `seism_boundaries(LabelMap)` as float32
        (1, h, w), read again from the .mat; not the training target (Laplacian != 0, thinned)."""
        if task != "edges":
            return target
        path = self.files[sample_id]["label_map"]
        label_map = check_shape(path, load_mat(path, "LabelMap"), tuple(target.shape[-2:]), plane=True)
        return torch.from_numpy(seism_boundaries(label_map))[None]


__all__ = [
    "HUMAN_PARTS",
    "PERSON_PARTS",
    "VOC_CLASSES",
    "MultiTaskDataset",
    "PascalContext",
    "edges_from_label_map",
    "normals_valid_classes",
    "read_human_parts",
    "seism_boundaries",
]
