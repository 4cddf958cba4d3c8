"""Mean intersection-over-union for semantic segmentation and human parts (docs/metrics.md).

Per-class TP / FP / FN are accumulated over the whole dataset (a confusion matrix), pixels whose target
is 255 are ignored, and the IoU of each class is TP / (TP + FP + FN). As in the public multi-task
evaluation code (ASTMT -> MTI-Net -> InvPT -> SAK `SemsegMeter` / `HumanPartsMeter`), the mean is over
*all* classes and a class absent from both the ground truth and the prediction counts as IoU 0 (their
`tp / max(tp + fp + fn, 1e-8)`). On the full validation sets every class occurs, so this only matters
for small subsets; `mIoU_present` (mean over classes seen in either) is reported beside it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import IGNORE, METRICS, Metric, check_finite, maps


class MeanIoU(Metric):
    """mIoU in percent. State: `confusion` (num_classes, num_classes) int64, rows = target, columns =
    prediction, over non-ignored pixels."""

    headline = "mIoU"
    higher_is_better = True
    default_classes: int | None = None

    def __init__(self, num_classes: int | None = None, ignore_index: int = IGNORE) -> None:
        num_classes = num_classes or self.default_classes
        if not num_classes or num_classes < 1:
            raise ValueError(f"{self.task}: num_classes must be a positive integer (or pass dataset=...)")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        super().__init__()

    def state_spec(self):
        return {"confusion": ((self.num_classes, self.num_classes), torch.int64)}

    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: (B, H, W) or (B, 1, H, W) class indices; target: the same shape, 255 = ignore."""
        pred, target = maps(self.task, pred, target)
        check_finite(self.task, pred)  # (a NaN read as "non-integer values", inf as a class out of range)
        pred, target = _as_labels(self.task, "prediction", pred), _as_labels(self.task, "target", target)
        valid = target != self.ignore_index
        p, t = pred[valid], target[valid]
        n = self.num_classes
        for name, values in (("target", t), ("prediction", p)):
            bad = values[(values < 0) | (values >= n)]
            if bad.numel():
                raise ValueError(
                    f"{self.task}: {name} holds class(es) {bad.unique()[:10].tolist()} outside 0..{n - 1} "
                    f"({n} classes; {self.ignore_index} = ignore in the target)"
                )
        self._state["confusion"] += torch.bincount(t * n + p, minlength=n * n).reshape(n, n)

    def compute(self) -> dict[str, float]:
        confusion = self._state["confusion"].double()
        if confusion.sum() == 0:
            return self._empty("no labelled pixel was scored")
        tp = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - tp  # tp + fp + fn
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.zeros_like(tp))
        present = union > 0
        out = {
            "mIoU": 100 * iou.mean().item(),
            "mIoU_present": 100 * iou[present].mean().item(),
            "pixel_acc": 100 * (tp.sum() / confusion.sum()).item(),
        }
        out.update({f"IoU/{i}": 100 * v for i, v in enumerate(iou.tolist())})
        return out


def _as_labels(task: str, name: str, x: Tensor) -> Tensor:
    if x.is_floating_point():
        if not torch.equal(x, x.round()):
            raise ValueError(
                f"{task}: the {name} holds non-integer values; expected class indices (argmax of the logits)"
            )
    return x.long()


@METRICS.register("semseg")
class SemsegMeanIoU(MeanIoU):
    task = "semseg"


@METRICS.register("parts")
class PartsMeanIoU(MeanIoU):
    """Human parts: 7 classes (background + 6 parts); images without people are all-ignore."""

    task = "parts"
    default_classes = 7
