"""The standard per-task prediction files: one folder per task, one file per sample id.

    <dir>/semseg/<id>.png     uint8 class indices (H, W)
    <dir>/parts/<id>.png      uint8 class indices (H, W)
    <dir>/saliency/<id>.png   uint8 grey, v = round(p * 255)
    <dir>/edges/<id>.png      uint8 grey, v = floor(p * 255) (as SAK's np.uint8(255 p), which SEISM scores)
    <dir>/normals/<id>.png    uint8 RGB, v = round((n + 1) / 2 * 255), read back as n = 2 v / 255 - 1
    <dir>/depth/<id>.npy      float32 metres (H, W)

`encode` turns one sample's prediction (what `Task.predict` gives, cropped back to the original size)
into the array that is stored; `decode` turns a stored array into the tensor the metrics take. Scoring
`decode(encode(pred))` in memory and scoring the files therefore give the same numbers bit for bit.
Saliency and edges decode to float32 k / 255, the values the reference evaluations hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..files import TASKS, write_whole

SUFFIX = {task: ".npy" if task == "depth" else ".png" for task in TASKS}  # (sak.files names the task folders)
SEGMENTATION = ("semseg", "parts")
PROBABILITY = ("saliency", "edges")


class PredictionError(ValueError):
    """A prediction that cannot be stored or scored; the message names the file where there is one."""


def _check_task(task: str) -> None:
    if task not in SUFFIX:
        raise PredictionError(f"no prediction format for task {task!r}; known: {sorted(SUFFIX)}")


def prediction_path(root: str | Path, task: str, sample_id: str) -> Path:
    _check_task(task)
    return Path(root) / task / f"{sample_id}{SUFFIX[task]}"


def _single_channel(task: str, pred: np.ndarray) -> np.ndarray:
    """(1, H, W) or (H, W) -> (H, W)."""
    if pred.ndim == 3 and pred.shape[0] == 1:
        pred = pred[0]
    if pred.ndim != 2:
        raise PredictionError(
            f"{task}: expected one sample's prediction of shape (1, H, W) or (H, W), got {pred.shape}"
        )
    return pred


def encode(task: str, pred: Tensor | np.ndarray) -> np.ndarray:
    """One sample's prediction in the update() conventions -> the stored array.

    semseg / parts (H, W) class indices -> uint8 (H, W); saliency / edges (1, H, W) probabilities ->
    uint8 (H, W); normals (3, H, W) -> uint8 (H, W, 3); depth (1, H, W) metres -> float32 (H, W).
    """
    _check_task(task)
    array = pred.detach().cpu().numpy() if isinstance(pred, Tensor) else np.asarray(pred)
    if task in SEGMENTATION:
        array = _single_channel(task, array)
        if array.size and (array.min() < 0 or array.max() > 255):
            raise PredictionError(f"{task}: class indices must be in 0..255 to be stored as PNG, got values in "
                                  f"[{array.min()}, {array.max()}]")  # fmt: skip
        return array.astype(np.uint8)
    if task == "normals" and (array.ndim != 3 or array.shape[0] != 3):
        raise PredictionError(f"normals: expected one sample's prediction of shape (3, H, W), got {array.shape}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise PredictionError(f"{task}: the prediction holds NaN or infinite values")
    if task == "normals":
        return np.rint((array.transpose(1, 2, 0) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    array = _single_channel(task, array)
    if task == "depth":
        return np.ascontiguousarray(array)
    if task == "edges":  # truncated, as SAK's saved PNGs that SEISM scores the published boundaries from
        return np.floor(array * 255.0).clip(0, 255).astype(np.uint8)
    return np.rint(array * 255.0).clip(0, 255).astype(np.uint8)  # rounded: nearest to the float SAK scores


def decode(task: str, array: np.ndarray) -> Tensor:
    """A stored array -> one sample's prediction in the update() conventions (no batch dimension):
    semseg / parts int64 (H, W); saliency / edges float32 (1, H, W) = k / 255; normals float32 (3, H, W)
    = 2 v / 255 - 1; depth float32 (1, H, W)."""
    _check_task(task)
    if task in SEGMENTATION:
        return torch.from_numpy(array.astype(np.int64))
    if task == "normals":
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float() * 2.0 / 255.0 - 1.0
    if task == "depth":
        return torch.from_numpy(np.asarray(array, dtype=np.float32).copy())[None]
    return (torch.from_numpy(array.astype(np.float32)) / 255.0)[None]


def save_encoded(root: str | Path, task: str, sample_id: str, array: np.ndarray) -> Path:
    """Write an array from `encode` to its standard path."""

    def write(tmp: Path) -> None:  # (the temporary name has no suffix: the format named)
        if task == "depth":
            with open(tmp, "wb") as f:
                np.save(f, array)
        else:
            Image.fromarray(array).save(tmp, format="PNG")

    # renamed when whole: never a cut file under its name (many small files: not synced one by one)
    return write_whole(prediction_path(root, task, sample_id), write, sync=False)


def write_predictions(
    root: str | Path, task: str, ids: Sequence[str], preds: Tensor | Iterable[Tensor | np.ndarray]
) -> list[Path]:
    """Write one file per sample: `preds` is a batch (B, ...) or a sequence of per-sample predictions
    (samples cropped back to different sizes cannot share a batch)."""
    preds = list(preds)
    if len(preds) != len(ids):
        raise PredictionError(f"{task}: {len(ids)} ids but {len(preds)} predictions")
    return [save_encoded(root, task, i, encode(task, p)) for i, p in zip(ids, preds, strict=True)]


def _load(path: Path, task: str) -> np.ndarray:
    if not path.is_file():
        if not path.parent.is_dir():  # the task's whole folder: said once, not as its first image's file
            raise PredictionError(
                f"{path.parent.parent}: no {path.parent.name}/ folder of {task} predictions (expected "
                f"{path.parent.name}/<id>{SUFFIX[task]}); leave {task} out of --tasks, or save its predictions"
            )
        raise PredictionError(f"{path}: prediction file not found (expected <id>{SUFFIX[task]} under {path.parent})")
    if task == "depth":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file (a copy cut short)
            raise PredictionError(f"{path}: cannot read the .npy array ({exc})") from exc
        if not isinstance(array, np.ndarray):  # np.load reads an .npz archive under any name
            array.close()
            raise PredictionError(f"{path}: an .npz archive, expected one array saved with np.save")
        if not np.issubdtype(array.dtype, np.floating):
            raise PredictionError(f"{path}: depth must be a floating-point array in metres, got dtype {array.dtype}")
        if not np.isfinite(array).all():
            raise PredictionError(f"{path}: the depth array holds NaN or infinite values")
        return array.astype(np.float32)
    try:
        with Image.open(path) as im:
            # a palette PNG of a grey or RGB map holds indices into its palette: its values are the palette's
            # colours (saliency was scored on the indices); class maps are meant as indices
            palette = im.mode == "P" and task not in SEGMENTATION
            array = np.array(im.convert("RGB") if palette else im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # (the last: no OSError)
        raise PredictionError(f"{path}: cannot read the PNG ({exc})") from exc
    if palette and task != "normals":
        if not ((array[..., 0] == array[..., 1]) & (array[..., 1] == array[..., 2])).all():
            raise PredictionError(f"{path}: a palette PNG of colours; {task} predictions are grey levels 0-255")
        array = array[..., 0]
    if array.dtype != np.uint8:
        raise PredictionError(f"{path}: expected an 8-bit PNG, got dtype {array.dtype}")
    return array


def read_prediction(
    root: str | Path, task: str, sample_id: str, size: tuple[int, int] | None = None, num_classes: int | None = None
) -> Tensor:
    """Read and decode one stored prediction, checked against the ground truth's `size` (h, w) and, for
    segmentation, the number of classes. Raises `PredictionError` naming the file."""
    path = prediction_path(root, task, sample_id)
    array = _load(path, task)
    expected_ndim = 3 if task == "normals" else 2
    if array.ndim != expected_ndim or (task == "normals" and array.shape[2] != 3):
        kind = "an RGB PNG (H, W, 3)" if task == "normals" else "a single-channel (H, W) map"
        colour = task in SEGMENTATION and array.ndim == 3  # (SAK's save_img writes its segmentations so)
        raise PredictionError(
            f"{path}: expected {kind}, got shape {array.shape}"
            + (" (a colour-coded segmentation? save class indices, 0..C-1, as grey PNGs)" if colour else "")
        )
    if size is not None and tuple(array.shape[:2]) != (int(size[0]), int(size[1])):
        raise PredictionError(
            f"{path}: prediction is {array.shape[0]}x{array.shape[1]}, the ground truth is {int(size[0])}x{int(size[1])}"
        )
    if task in SEGMENTATION and num_classes is not None:
        bad = np.unique(array[array >= num_classes])
        if bad.size:
            raise PredictionError(
                f"{path}: class value(s) {bad[:10].tolist()} out of range; expected 0..{num_classes - 1}"
            )
    return decode(task, array)


__all__ = [
    "SUFFIX",
    "PredictionError",
    "decode",
    "encode",
    "prediction_path",
    "read_prediction",
    "save_encoded",
    "write_predictions",
]
