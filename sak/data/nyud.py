"""NYUD-v2 in the multi-task layout ("NYUD_MT") of the public multi-task repositories.

Layout under `root` (see docs/datasets.md):
    images/<id>.png                 RGB (".jpg" is read too: the MTL-PyTorch / InvPT release)
    segmentation/<id>.png           0 = unlabelled, 1..40 the NYU-40 classes
    normals/<id>.png                RGB, n = 2 v / 255 - 1 (".npy" float (H, W, 3) in [-1, 1] is read too)
    edge/<id>.png                   0 / 255 boundaries (".npy" float {0, 1} is read too)
    depth/<id>.npy                  float metres (H, W)
    gt_sets/{train,val}.txt         the split ids (795 / 654)

Targets: semseg = file value - 1 with 0 -> 255 (40 classes, background ignored, as SAK and InvPT);
normals valid everywhere (all-zero only in padding); edges / 255; depth in metres, 0 = ignore.
The evaluation canvas is 448x576 (the size SAK trains and tests NYUD at).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..registry import DATASETS
from .base import IGNORE_INDEX
from .images import DataError, decode_rgb
from .pascal_context import MultiTaskDataset, check_shape, read_fraction, read_png

NYU40_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
    "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat", "clothes",
    "ceiling", "books", "refrigerator", "television", "paper", "towel", "shower curtain", "box", "whiteboard",
    "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure", "otherfurniture",
    "otherprop",
)  # fmt: skip

# (folder, extensions tried in order) per file kind
LAYOUT = {
    "image": ("images", (".png", ".jpg")),
    "semseg": ("segmentation", (".png",)),
    "normals": ("normals", (".png", ".npy")),
    "edges": ("edge", (".png", ".npy")),
    "depth": ("depth", (".npy",)),
}


def load_npy(path: Path, shape: tuple[int, int], channels: int) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file (a copy cut short)
        raise DataError(f"{path}: cannot read the .npy array ({exc})") from exc
    if not isinstance(array, np.ndarray):  # np.load reads an .npz archive under any name
        array.close()
        raise DataError(f"{path}: an .npz archive, expected one array saved with np.save")
    expected = shape if channels == 1 else (*shape, channels)
    if array.shape != expected:
        raise DataError(
            f"{path}: array of shape {array.shape}, expected {expected} (the image is {shape[0]}x{shape[1]})"
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise DataError(f"{path}: an array of {array.dtype}, expected numbers (float32 metres or unit vectors)")
    if not np.isfinite(array).all():
        raise DataError(f"{path}: the array holds NaN or infinite values")
    return array.astype(np.float32)


MAX_DEPTH_M = 100.0  # far above any NYUD-v2 depth, far below the same map in millimetres


def check_range(path: Path, array: np.ndarray, low: float, high: float, what: str) -> np.ndarray:
    """`array` if its values lie in [low, high] (to float32 rounding), else a DataError naming the file: a map of
    0/255 edges or PNG-range normals saved as .npy trained on, with 255 read as the ignore value."""
    slack = 1e-3 * (high - low)
    if array.size and (array.min() < low - slack or array.max() > high + slack):
        raise DataError(
            f"{path}: values from {array.min():g} to {array.max():g}, expected {what} in [{low:g}, {high:g}]"
        )
    return array


@DATASETS.register("nyud")
class NYUD(MultiTaskDataset):
    """NYUD-v2 multi-task (semseg 40, normals, edges, depth); eval canvas 448x576."""

    supported_tasks = ("semseg", "normals", "edges", "depth")
    task_classes = {"semseg": len(NYU40_CLASSES)}
    eval_size_default = (448, 576)

    @dataclass
    class Options(MultiTaskDataset.Options):
        pass

    def split_file(self, split: str) -> Path:
        return self.root / "gt_sets" / f"{split}.txt"

    def locate(self, sample_id: str) -> dict[str, Path]:
        files = {}
        for kind in ("image", *self.spec.tasks):
            folder, extensions = LAYOUT[kind]
            candidates = [self.root / folder / f"{sample_id}{ext}" for ext in extensions]
            files[kind] = next((p for p in candidates if p.is_file()), candidates[0])
        return files

    def load_raw(self, sample_id: str, tasks: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        files = self.files[sample_id]
        image = decode_rgb(files["image"], exif=False)  # (labels: stored unrotated)
        shape = image.shape[:2]
        raw = {"image": image}
        for task in self.spec.tasks if tasks is None else tasks:
            path = files[task]
            if task == "semseg":
                label = check_shape(path, read_png(path, 1), shape).astype(np.int64)
                bad = np.unique(label[label > len(NYU40_CLASSES)])
                if bad.size:
                    raise DataError(f"{path}: value(s) {bad[:10].tolist()} out of range; expected 0 (unlabelled) .. 40")
                raw[task] = np.where(label == 0, IGNORE_INDEX, label - 1)
            elif task == "normals" and path.suffix == ".npy":
                raw[task] = check_range(
                    path, load_npy(path, shape, 3), -1.0, 1.0, "unit normals (2 v / 255 - 1 of a PNG)"
                )
            elif task == "normals":
                raw[task] = 2.0 * check_shape(path, read_png(path, 3), shape).astype(np.float32) / 255.0 - 1.0
            elif task == "edges" and path.suffix == ".npy":
                raw[task] = check_range(path, load_npy(path, shape, 1), 0.0, 1.0, "edge values (a 0/255 map / 255)")
            elif task == "edges":
                raw[task] = read_fraction(path, shape)
            elif task == "depth":
                depth = load_npy(path, shape, 1)
                if (depth < 0).any():
                    raise DataError(f"{path}: negative depth values (expected metres, 0 = invalid)")
                if depth.max(initial=0.0) > MAX_DEPTH_M:  # (NYUD-v2's Kinect depth stays below 10 m)
                    raise DataError(f"{path}: depth up to {depth.max():g}, expected metres (NYUD-v2's stay below 10): "
                                    "millimetres? divide by 1000")  # fmt: skip
                raw[task] = depth
        return raw
