"""Depth RMSE in metres (docs/metrics.md), as the public MTI-Net / InvPT / SAK `DepthMeter`.

RMSE = sqrt(sum of squared errors / number of valid pixels), both summed over the *whole dataset*
(not a mean of per-image RMSEs). Valid: target > 0 (sak's ignore is 0; the reference's `!= 0` /
`> 0`) and, when `max_depth` is given, target < max_depth (SAK's meter uses 80 m, which never binds on
NYUD). Predictions <= 0 are replaced by 1e-9 first, as the reference does (its heads also clamp at 0).
Also reported: `log_rmse` (natural log), `abs_rel`, and `rmse_per_image`, the mean of per-image RMSEs
over images with a valid pixel (the other aggregation found in depth literature; not comparable).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import METRICS, Metric, check_finite, maps

MIN_DEPTH = 1e-9


@METRICS.register("depth")
class DepthRMSE(Metric):
    """State: float64 sums `sq_err`, `sq_log_err`, `abs_rel`, `image_rmse`; int64 `count`, `images`."""

    task = "depth"
    headline = "rmse"
    higher_is_better = False

    def __init__(self, max_depth: float | None = None) -> None:
        self.max_depth = max_depth
        super().__init__()

    def state_spec(self):
        return {
            "sq_err": ((), torch.float64),
            "sq_log_err": ((), torch.float64),
            "abs_rel": ((), torch.float64),
            "image_rmse": ((), torch.float64),
            "count": ((), torch.int64),
            "images": ((), torch.int64),
        }

    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: (B, 1, H, W) or (B, H, W) metres; target: the same shape, 0 = no measurement."""
        pred, target = maps(self.task, pred, target)
        check_finite(self.task, pred)
        pred, target = pred.double(), target.double()
        valid = (target > 0) & target.isfinite()
        if self.max_depth is not None:
            valid &= target < self.max_depth
        pred = torch.where(pred > 0, pred, torch.full_like(pred, MIN_DEPTH))
        sq = torch.where(valid, (pred - target) ** 2, torch.zeros_like(pred))
        per_image_n = valid.flatten(1).sum(1)
        per_image_sq = sq.flatten(1).sum(1)
        has = per_image_n > 0
        g, p = target[valid], pred[valid]
        self._state["sq_err"] += per_image_sq.sum()
        self._state["sq_log_err"] += ((g.log() - p.log()) ** 2).sum()
        self._state["abs_rel"] += ((g - p).abs() / g).sum()
        self._state["image_rmse"] += (per_image_sq[has] / per_image_n[has]).sqrt().sum()
        self._state["count"] += int(per_image_n.sum())
        self._state["images"] += int(has.sum())

    def compute(self) -> dict[str, float]:
        n = int(self._state["count"])
        if n == 0:
            return self._empty("no valid depth was scored")
        return {
            "rmse": math.sqrt(self._state["sq_err"].item() / n),
            "log_rmse": math.sqrt(self._state["sq_log_err"].item() / n),
            "abs_rel": self._state["abs_rel"].item() / n,
            "rmse_per_image": self._state["image_rmse"].item() / int(self._state["images"]),
        }
