"""Surface-normal mean angular error (docs/metrics.md), as the public InvPT / SAK `NormalsMeter`.

Both prediction and ground truth are L2-normalised per pixel (a zero vector stays zero, as the
reference's `normalize_tensor`), the angle is 2 atan2(|p - g|, |p + g|) in degrees (accurate near 0
and 180, unlike acos of the dot product) and mErr is its mean over the valid pixels of the whole
dataset. Valid: the target is not all-zero (sak's ignore, sak/data/base.py) and has no channel equal
to 255 (the reference loaders' ignore after `AddIgnoreRegions`). Also reported, as the ASTMT
evaluation does: `rmse` (root mean squared angle) and the percentage of pixels under 11.25, 22.5 and
30 degrees. Angles are computed in float64 (the reference uses float32).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import IGNORE, METRICS, Metric, check_finite, vector_maps

WITHIN = (11.25, 22.5, 30.0)


def angular_error_degrees(pred: Tensor, target: Tensor) -> Tensor:
    """(B, 3, H, W) x 2 -> (B, H, W) angle between the normalised vectors, in degrees."""
    p, g = _normalize(pred.double()), _normalize(target.double())
    return torch.rad2deg(2 * torch.atan2((p - g).norm(dim=1), (p + g).norm(dim=1)))


def _normalize(x: Tensor) -> Tensor:
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, x / norm.clamp_min(1e-300), torch.zeros_like(x))


@METRICS.register("normals")
class NormalsAngularError(Metric):
    """State: `sum_deg`, `sum_sq_deg` () float64, `within` (3,) int64, `count` () int64."""

    task = "normals"
    headline = "mErr"
    higher_is_better = False

    def state_spec(self):
        return {
            "sum_deg": ((), torch.float64),
            "sum_sq_deg": ((), torch.float64),
            "within": ((len(WITHIN),), torch.int64),
            "count": ((), torch.int64),
        }

    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: (B, 3, H, W), need not be unit length; target: (B, 3, H, W), all-zero = ignore."""
        pred, target = vector_maps(self.task, pred, target, 3)
        check_finite(self.task, pred)
        if target.numel() and not bool(target.isfinite().all()):  # it would pass as valid and score 90 degrees
            bad = int((~target.isfinite()).sum())
            raise ValueError(f"{self.task}: {bad} ground-truth value(s) are NaN or infinite (a damaged label?)")
        valid = (target != 0).any(1) & (target != IGNORE).all(1)
        deg = angular_error_degrees(pred, target)[valid]
        self._state["sum_deg"] += deg.sum()
        self._state["sum_sq_deg"] += (deg * deg).sum()
        self._state["within"] += torch.stack([(deg < w).sum() for w in WITHIN])
        self._state["count"] += deg.numel()

    def compute(self) -> dict[str, float]:
        n = int(self._state["count"])
        if n == 0:
            return self._empty("no valid normal was scored")
        out = {
            "mErr": self._state["sum_deg"].item() / n,
            "rmse": math.sqrt(self._state["sum_sq_deg"].item() / n),
        }
        out.update({f"{w:g}": 100 * c / n for w, c in zip(WITHIN, self._state["within"].tolist(), strict=True)})
        return out
