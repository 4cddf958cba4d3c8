"""A `Task` says how many channels a head predicts, how to score logits against a target (loss),
how to turn logits into the prediction that is saved and evaluated, and how to show that prediction
in colour (`visualize`, which `sak viz preds` draws with).

Adding a task is one file: subclass `Task`, register it with `@TASKS.register("name")`, and list the
module under `imports:` if it lives outside `sak`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from torch import Tensor


def label_palette() -> np.ndarray:
    """(256, 3) uint8: the PASCAL VOC colour map, in which label 0 (background) is black and the bits of a
    label are dealt out to red, green and blue from the most significant bit down (1 dark red, 2 dark
    green, 3 olive, ..., 255 = ignore, light grey), so that neighbouring labels get distant colours."""
    labels = np.arange(256)
    palette = np.zeros((256, 3), np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((labels >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette.astype(np.uint8)


def stretch(values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """`values` mapped onto 0..1 over the 2-98% range of the `valid` ones (all by default); constant maps give 0."""
    chosen = values[valid] if valid is not None else values.reshape(-1)
    if chosen.size == 0:
        return np.zeros_like(values, dtype=np.float64)
    lo, hi = np.percentile(chosen, [2, 98])
    return np.clip((values - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(values, dtype=np.float64)


class Task:
    """Attributes:
    name: the key of this task's target in a sample and of its head.
    channels: output channels of the head (classes for segmentation).
    default_weight: the published loss weight (PASCAL-Context, SAK, ICLR 2025).
    """

    name: ClassVar[str] = ""
    default_channels: ClassVar[int] = 1
    default_weight: ClassVar[float] = 1.0
    fixed_channels: ClassVar[bool] = False  # the head's output is fixed (normals: 3): `channels` must be that

    def __init__(self, channels: int | None = None, weight: float | None = None) -> None:
        if channels is not None and (channels < 1 or (self.fixed_channels and channels != self.default_channels)):
            right = f"{self.default_channels} or left out" if self.fixed_channels else "at least 1"
            raise ValueError(f"channels {channels}: the {self.name} head's channels must be {right}")
        self.channels = self.default_channels if channels is None else channels
        self.weight = self.default_weight if weight is None else weight

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:  # pragma: no cover - abstract
        """logits (B, channels, H, W) at the target's size -> scalar."""
        raise NotImplementedError

    def target_problem(self, target: Tensor) -> str | None:
        """What is wrong with one sample's target for this head (a class index the head has no channel for),
        or None. Checked on the CPU by the data loader, for every sample a run trains or evaluates on: the loss
        would fail deep inside (an IndexError on the CPU, a device-side assert on a GPU) or be silently wrong.
        By default nothing is checked."""
        return None

    def predict(self, logits: Tensor) -> Tensor:  # pragma: no cover - abstract
        """logits -> the prediction the metric and the saved outputs use."""
        raise NotImplementedError

    def visualize(self, prediction: Tensor) -> np.ndarray:
        """One sample's prediction (what `predict` gives, without the batch dimension) -> an RGB uint8 (H, W, 3)
        picture. By default class indices (H, W) in `label_palette`'s colours, one channel in grey and three
        as RGB, each stretched over its 2-98% range; the dense tasks draw theirs on fixed scales."""
        array = prediction.detach().cpu().numpy()
        if array.ndim == 2:
            return label_palette()[array.astype(np.int64).clip(0, 255)]
        if array.ndim == 3 and array.shape[0] in (1, 3):
            channels = np.stack([stretch(c) for c in array.astype(np.float64)], axis=-1)
            return np.rint(np.broadcast_to(channels, (*array.shape[1:], 3)) * 255).astype(np.uint8)
        raise ValueError(
            f"{self.name}: cannot draw a prediction of shape {tuple(array.shape)}; expected (H, W) class indices or "
            "(1, H, W) / (3, H, W) maps (a task with other outputs overrides Task.visualize)"
        )

    def unscale(self, prediction: Tensor, scale: float) -> Tensor:
        """A prediction made on the image resized by `scale`, in the original image's terms (its pixels are
        resized by the caller): unchanged for most tasks; depth undoes the training's rule (depth / scale)."""
        return prediction

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels}, weight={self.weight})"
