"""Saliency maxF and mIoU (docs/metrics.md), as the public SAK `SaliencyMeter` computes them.

For each threshold t of float32 `torch.arange(0.05, 1, 0.05)` (19 values; note the 12th is
0.59999996, not float32(0.6) = 0.60000002, since torch and numpy round the range differently) a pixel is
predicted salient when `pred >= t`, compared in float32 (the reference's `preds.float() / 255.` against
its float32 thresholds; the older ASTMT / MTI-Net code used `>`). TP, predicted positives and actual
positives are summed over the valid pixels (target != 255) of the whole dataset per threshold;
F = (1 + b2) P R / (b2 P + R) with b2 = 0.3; maxF is the maximum over thresholds, x100. Undefined
ratios count as 0, as the reference's `1e-8` guards make them. Counts are exact int64 (the reference
sums in float32, which rounds once the counts pass 2^24; the effect is far below 0.01).

mIoU, also SAK's: per image and threshold the IoU of the thresholded map with the target over its valid
pixels, averaged over the images, maximum over thresholds, x100. An image with no valid pixel is left
out; one whose union is empty at a threshold (no salient pixel in the target nor above t) counts IoU 1
there, where the reference divides by zero and stops.

InvPT's and TaskPrompter's meters (prismformore/Multi-Task-Transformer, evaluation/eval_sal.py) apply a
sigmoid to the / 255 values before thresholding, so on probabilities their thresholds fall at logit(t);
their published maxF is not this measure.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import IGNORE, METRICS, Metric, check_probability, maps


def saliency_thresholds(step: float = 0.05) -> Tensor:
    """The reference's float32 thresholds: `torch.arange(step, 1, step)`."""
    return torch.arange(step, 1, step, dtype=torch.float32)


@METRICS.register("saliency")
class SaliencyMaxF(Metric):
    """State: `tp`, `pred_pos`, `gt_pos` (T,) int64 per threshold, `valid` () int64, `iou_sum` (T,) float64
    (the images' IoUs summed per threshold) and `images` () int64 (images with a valid pixel)."""

    task = "saliency"
    headline = "maxF"
    higher_is_better = True

    def __init__(self, beta2: float = 0.3, threshold_step: float = 0.05) -> None:
        if not 0 < threshold_step < 1:
            raise ValueError(f"saliency: threshold_step must be in (0, 1), got {threshold_step}")
        if not beta2 > 0:
            raise ValueError(f"saliency: beta2 (beta squared of the F-measure) must be positive, got {beta2}")
        self.beta2 = float(beta2)
        self.thresholds = saliency_thresholds(threshold_step)
        super().__init__()

    def state_spec(self):
        t = (len(self.thresholds),)
        return {
            "tp": (t, torch.int64),
            "pred_pos": (t, torch.int64),
            "gt_pos": (t, torch.int64),
            "valid": ((), torch.int64),
            "iou_sum": (t, torch.float64),
            "images": ((), torch.int64),
        }

    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: (B, 1, H, W) or (B, H, W) probability of "salient"; target: 0 / 1, 255 = ignore."""
        pred, target = maps(self.task, pred, target)
        check_probability(self.task, pred)
        valid = target != IGNORE
        labels = target[valid]
        if not ((labels == 0) | (labels == 1)).all():
            raise ValueError(
                f"{self.task}: target values must be 0, 1 or {IGNORE}, got {labels.unique()[:10].tolist()}"
            )
        n_t = len(self.thresholds)
        for p, t, v in zip(pred, target, valid, strict=True):  # per image: its IoU per threshold
            gt = t[v].bool()
            if not gt.numel():
                continue
            # level = number of thresholds t with t <= p, so p >= thresholds[j] exactly when level > j
            level = torch.bucketize(p[v].float(), self.thresholds, right=True)
            above, above_pos, positives = _count_at_least(level, n_t), _count_at_least(level[gt], n_t), int(gt.sum())
            self._state["tp"] += above_pos
            self._state["pred_pos"] += above
            self._state["gt_pos"] += positives
            self._state["valid"] += gt.numel()
            union = above + positives - above_pos
            iou = torch.where(union > 0, above_pos.double() / union.clamp_min(1), torch.ones((), dtype=torch.float64))
            self._state["iou_sum"] += iou
            self._state["images"] += 1

    def compute(self) -> dict[str, float]:
        if self._state["valid"] == 0:
            return self._empty("no valid pixel was scored")
        tp, pp, ap = (self._state[k].double() for k in ("tp", "pred_pos", "gt_pos"))
        precision = torch.where(pp > 0, tp / pp.clamp_min(1), torch.zeros_like(tp))
        recall = torch.where(ap > 0, tp / ap.clamp_min(1), torch.zeros_like(tp))
        denom = self.beta2 * precision + recall
        f = torch.where(
            denom > 0, (1 + self.beta2) * precision * recall / denom.clamp_min(1e-300), torch.zeros_like(tp)
        )
        best = int(f.argmax())
        iou = self._state["iou_sum"] / self._state["images"]
        return {
            "maxF": 100 * f[best].item(),
            "threshold": self.thresholds[best].item(),
            "precision": 100 * precision[best].item(),
            "recall": 100 * recall[best].item(),
            "mIoU": 100 * iou.max().item(),
            "mIoU_threshold": self.thresholds[int(iou.argmax())].item(),
        }


def _count_at_least(level: Tensor, n: int) -> Tensor:
    """counts[j] = #(level > j) for j < n."""
    hist = torch.bincount(level.flatten(), minlength=n + 1)
    return hist.flip(0).cumsum(0).flip(0)[1:]
