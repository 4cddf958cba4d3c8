"""A `Task` says how many channels a head predicts, how to score logits against a target (loss),
and how to turn logits into the prediction that is saved and evaluated.

Adding a task is one file: subclass `Task`, register it with `@TASKS.register("name")`, and list the
module under `imports:` if it lives outside `sak`.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor


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

    def predict(self, logits: Tensor) -> Tensor:  # pragma: no cover - abstract
        """logits -> the prediction the metric and the saved outputs use."""
        raise NotImplementedError

    def unscale(self, prediction: Tensor, scale: float) -> Tensor:
        """A prediction made on the image resized by `scale`, in the original image's terms (its pixels are
        resized by the caller): unchanged for most tasks; depth undoes the training's rule (depth / scale)."""
        return prediction

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels}, weight={self.weight})"
