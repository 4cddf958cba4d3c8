"""Boundary detection odsF / oisF (docs/metrics.md): the SEISM / BSDS benchmark in Python.

Per image and per threshold t_j = j / (n + 1), j = 1..n (n = 99: 0.01 .. 0.99): (optionally) NMS the
prediction and quantise it to k / 255 as the reference's `nms_process` + PNG round trip does; binarise
with `>= t_j`; thin; match one-to-one to the ground-truth boundary pixels within tolerance x diagonal
(see boundary.py). The counts (cntR, sumR, cntP, sumP) are summed over the dataset per threshold;
R = cntR / sumR, P = cntP / sumP, F = 2PR / (P + R) (0 where undefined: the same F as SEISM's special
cases), odsF = max over thresholds (first on ties), x100. oisF: each image's counts at its own best
threshold (by that image's F, first on ties, as MATLAB's `max`) are summed and F taken of the sums.

The ground truth is the target it is given (any value > 0 is boundary). `sak eval` passes the
benchmark's: on PASCAL-Context SEISM's `seg2bmap(LabelMap)` (`boundary.seg2bmap`, a one-sided boundary;
`PascalContext.eval_target`), not the training target (label-map Laplacian != 0, thinned); on NYUD the
edge map as stored. Target pixels equal to 255 are ignored (neither ground truth nor prediction).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .base import IGNORE, METRICS, Metric, check_probability, maps
from .boundary import candidate_pairs, match_count, match_radius, nms_edges, thin_points

CNT_R, SUM_R, CNT_P, SUM_P = range(4)


@METRICS.register("edges")
class BoundaryF(Metric):
    """State: `counts` (n, 4) int64 [cntR, sumR, cntP, sumP] per threshold, `ois` (4,) int64 (each
    image's counts at its best threshold), `images` () int64.

    Args:
        tolerance: maximum match distance as a fraction of the image diagonal (0.0075 PASCAL / BSDS,
            0.011 NYUD; `build_metric` picks it from the dataset).
        n_thresholds: n; thresholds j / (n + 1).
        nms: apply the reference's NMS (convTri + edgesNms, r=4, s=5, m=1.01) before thresholding.
        quantize: round the (NMS) map to k / 255 before thresholding, as the reference's uint8 PNG.
        thin: thin each binarised map (SEISM's `edgesEvalImg` default).
    """

    task = "edges"
    headline = "odsF"
    higher_is_better = True

    def __init__(
        self,
        tolerance: float = 0.0075,
        n_thresholds: int = 99,
        nms: bool = True,
        quantize: bool = True,
        thin: bool = True,
    ) -> None:
        if not 0 < tolerance < 1:
            raise ValueError(f"edges: tolerance is a fraction of the image diagonal in (0, 1), got {tolerance}")
        if not math.isfinite(n_thresholds) or int(n_thresholds) != n_thresholds or n_thresholds < 1:
            raise ValueError(f"edges: n_thresholds must be a whole number, at least 1, got {n_thresholds}")
        self.tolerance = float(tolerance)
        self.n_thresholds = int(n_thresholds)
        self.nms, self.quantize, self.thin = nms, quantize, thin
        self.thresholds = np.arange(1, self.n_thresholds + 1) / (self.n_thresholds + 1)
        # quantised maps: level(k) = number of thresholds with k / 255 >= j / (n + 1), in exact integers
        steps = np.arange(1, self.n_thresholds + 1)
        self._level_of_k = (np.arange(256)[:, None] * (self.n_thresholds + 1) >= 255 * steps[None]).sum(1)
        # values below this never pass the lowest threshold, so NMS need not examine them
        lowest = (np.argmax(self._level_of_k > 0) - 0.5) / 255 if quantize else self.thresholds[0]
        self._floor = float(lowest) * (1 - 1e-6)
        super().__init__()

    def state_spec(self):
        return {
            "counts": ((self.n_thresholds, 4), torch.int64),
            "ois": ((4,), torch.int64),
            "images": ((), torch.int64),
        }

    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: (B, 1, H, W) or (B, H, W) boundary probability in [0, 1]; target: 0 / 1, 255 = ignore."""
        pred, target = maps(self.task, pred, target)
        check_probability(self.task, pred)
        for p, t in zip(pred.float().numpy(), target.numpy(), strict=True):
            counts = self.image_counts(p, t)
            self._state["counts"] += torch.from_numpy(counts)
            self._state["ois"] += torch.from_numpy(counts[int(np.argmax(_f_measure(counts)))])
            self._state["images"] += int((t != IGNORE).any())  # (an image all ignored is not scored)

    def image_counts(self, pred: np.ndarray, target: np.ndarray) -> np.ndarray:
        """(H, W) probability and target -> (n, 4) int64 counts [cntR, sumR, cntP, sumP] per threshold."""
        ignore = target == IGNORE
        gt = (target > 0) & ~ignore
        level = self._levels(nms_edges(pred, self._floor) if self.nms else pred.astype(np.float32))
        level[ignore] = 0
        cand_y, cand_x = np.nonzero(level)  # every pixel some threshold keeps, before thinning
        cand_level = level[cand_y, cand_x]
        rows, cols, n_gt = candidate_pairs(cand_y, cand_x, gt, match_radius(gt.shape, self.tolerance))
        counts = np.zeros((self.n_thresholds, 4), dtype=np.int64)
        counts[:, SUM_R] = n_gt
        present = np.bincount(cand_level, minlength=self.n_thresholds + 1)
        canvas = np.zeros((gt.shape[0] + 2, gt.shape[1] + 2), dtype=bool)
        for j in range(1, self.n_thresholds + 1):
            if j > 1 and present[j - 1] == 0:  # no pixel sits at level j - 1: same binary map as before
                counts[j - 1] = counts[j - 2]
                continue
            active = cand_level >= j
            if self.thin and active.any():
                ys, xs = cand_y[active] + 1, cand_x[active] + 1
                canvas[ys, xs] = True
                survivors = thin_points(canvas, ys, xs)
                canvas[ys, xs] = False
                active[np.flatnonzero(active)[~survivors]] = False
            keep = active[rows]
            matched = match_count(rows[keep], cols[keep], len(cand_y), n_gt)
            counts[j - 1, [CNT_R, CNT_P, SUM_P]] = matched, matched, int(active.sum())
        return counts

    def _levels(self, edges: np.ndarray) -> np.ndarray:
        """Per pixel, how many thresholds it passes (binary map at threshold j = level >= j)."""
        if self.quantize:
            scaled = np.clip(edges.astype(np.float32) * np.float32(255), 0, 255)
            k = np.floor(scaled)
            k += scaled - k >= 0.5  # MATLAB's uint8(): round half away from zero
            return self._level_of_k[k.astype(np.int64)]
        return np.searchsorted(self.thresholds, edges.astype(np.float64), side="right")

    def compute(self) -> dict[str, float]:
        if self._state["images"] == 0:
            return self._empty("no image with a labelled pixel was scored")
        counts = self._state["counts"].numpy()
        f, p, r = _f_measure(counts, with_pr=True)
        best = int(np.argmax(f))
        ois_f, ois_p, ois_r = (float(v[0]) for v in _f_measure(self._state["ois"].numpy()[None], with_pr=True))
        return {
            "odsF": 100 * float(f[best]),
            "odsP": 100 * float(p[best]),
            "odsR": 100 * float(r[best]),
            "odsT": float(self.thresholds[best]),
            "oisF": 100 * ois_f,
            "oisP": 100 * ois_p,
            "oisR": 100 * ois_r,
        }


def _f_measure(counts: np.ndarray, with_pr: bool = False):
    """(..., 4) counts -> F (and P, R) with 0 wherever a ratio is undefined."""
    counts = counts.astype(np.float64)
    r = np.divide(counts[..., CNT_R], counts[..., SUM_R], out=np.zeros(counts.shape[:-1]), where=counts[..., SUM_R] > 0)
    p = np.divide(counts[..., CNT_P], counts[..., SUM_P], out=np.zeros(counts.shape[:-1]), where=counts[..., SUM_P] > 0)
    f = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    return (f, p, r) if with_pr else f
