"""The common interface of the published multi-task metrics (docs/metrics.md).

A `Metric` accumulates one task's sufficient statistics over a dataset, batch by batch, and turns them
into the published numbers. The statistics are *additive*: the state of a dataset is the sum of the
states of any partition of it, which is what makes multi-process evaluation exact (`sync_metric`) and
lets shards be scored separately and merged (`load_state` of the summed states).
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from torch import Tensor

from ..registry import Registry

METRICS: Registry = Registry("metric")
IGNORE = 255  # ignore value of label, saliency and edge targets (sak/data/base.py)


class Metric:
    """One task's dataset-level metric.

    Subclasses set `task`, `headline`, `higher_is_better`, declare their state in `state_spec()` and
    implement `update` and `compute`. Predictions and targets are batched (B, ...) and already cropped
    back to the original image size; they may live on any device, statistics are kept on the CPU as
    int64 / float64.
    """

    task: ClassVar[str] = ""
    headline: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True

    def __init__(self) -> None:
        self._state: dict[str, Tensor] = {}
        self.reset()

    # ---- state -------------------------------------------------------------------------------
    def state_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:  # pragma: no cover - abstract
        """name -> (shape, dtype) of every accumulated statistic."""
        raise NotImplementedError

    def reset(self) -> None:
        self._state = {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in self.state_spec().items()}

    def state(self) -> dict[str, Tensor]:
        """Copies of the additive statistics: summing the states of disjoint shards gives the union's."""
        return {name: value.clone() for name, value in self._state.items()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Replace the statistics (e.g. with the sum of several shards' `state()`)."""
        spec = self.state_spec()
        if set(state) != set(spec):
            raise ValueError(f"{type(self).__name__}.load_state: got keys {sorted(state)}, expected {sorted(spec)}")
        loaded = {}
        for name, (shape, dtype) in spec.items():
            value = torch.as_tensor(state[name]).detach().to("cpu")
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"{type(self).__name__}.load_state: {name!r} has shape {tuple(value.shape)}, expected {shape}"
                )
            loaded[name] = value.to(dtype).clone()
        self._state = loaded

    # ---- scoring -----------------------------------------------------------------------------
    def update(self, pred: Tensor, target: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute(self) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _empty(self, what: str) -> dict[str, float]:
        """The result of a metric that has seen nothing to score: NaN headline, with a warning."""
        warnings.warn(
            f"{type(self).__name__} ({self.task}): {what}; {self.headline} is NaN", RuntimeWarning, stacklevel=3
        )
        return {self.headline: float("nan")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r}, headline={self.headline!r})"


# -------------------------------------------------------------------------------------------------
# input checks shared by the metrics
# -------------------------------------------------------------------------------------------------
def maps(task: str, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Single-channel maps as (B, H, W) on the CPU: accepts (B, H, W) or (B, 1, H, W) for either."""
    p, t = _squeeze_channel(pred), _squeeze_channel(target)
    if p is None or t is None or p.shape != t.shape:
        raise ValueError(
            f"{task}: prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}; "
            "expected (B, H, W) or (B, 1, H, W) for both, same B, H, W"
        )
    return p.detach().to("cpu"), t.detach().to("cpu")


def vector_maps(task: str, pred: Tensor, target: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """(B, C, H, W) maps with C = `channels`, same shape, on the CPU."""
    if pred.ndim != 4 or pred.shape[1] != channels or pred.shape != target.shape:
        raise ValueError(
            f"{task}: prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}; "
            f"expected (B, {channels}, H, W) for both"
        )
    return pred.detach().to("cpu"), target.detach().to("cpu")


def check_finite(task: str, pred: Tensor) -> None:
    """Refuse NaN or infinite predictions: every metric would score them as some wrong value (a NaN saliency
    pixel counted salient at every threshold, a NaN depth as 1e-9 m) or crash without saying why."""
    if pred.numel() and not bool(pred.isfinite().all()):
        bad = int((~pred.isfinite()).sum())
        raise ValueError(f"{task}: {bad} prediction value(s) are NaN or infinite (a diverged model?)")


def check_probability(task: str, pred: Tensor) -> None:
    """Saliency and boundary predictions are probabilities: refuse logits passed by mistake, and NaN."""
    check_finite(task, pred)
    if pred.numel() and (pred.min() < -1e-3 or pred.max() > 1 + 1e-3):
        raise ValueError(
            f"{task}: predictions must be probabilities in [0, 1], got values in "
            f"[{pred.min().item():.4g}, {pred.max().item():.4g}] (logits? use the task's predict())"
        )


def _squeeze_channel(x: Tensor) -> Tensor | None:
    if x.ndim == 4 and x.shape[1] == 1:
        return x[:, 0]
    return x if x.ndim == 3 else None
