"""The published multi-task metrics (docs/metrics.md).

One `Metric` per task, from `build_metric(task, dataset)`: `update(pred, target)` per batch (predictions
cropped back to the original size), `sync_metric(metric, accelerator)` to sum the additive state over
processes, then `compute()` for the published numbers (`metric.headline` names the one tables use).
`delta_m` and the published rows (`published.py`) turn a set of task scores into the papers' summary.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

from .base import METRICS, Metric
from .depth import DepthRMSE
from .edges import BoundaryF
from .normals import NormalsAngularError
from .published import LOWER_IS_BETTER, PUBLISHED, SINGLE_TASK, PublishedRow
from .saliency import SaliencyMaxF
from .segmentation import MeanIoU, PartsMeanIoU, SemsegMeanIoU

# Per dataset: the tasks it has and the options they take from it (class counts, boundary tolerance).
DATASET_OPTIONS: dict[str, dict[str, dict]] = {
    "pascal_context": {
        "semseg": {"num_classes": 21},
        "parts": {"num_classes": 7},
        "saliency": {},
        "normals": {},
        "edges": {"tolerance": 0.0075},
    },
    "nyud": {
        "semseg": {"num_classes": 40},
        "normals": {},
        "edges": {"tolerance": 0.011},
        "depth": {},
    },
}


def build_metric(task: str, dataset: str | None = None, **options) -> Metric:
    """The metric of `task`, with the dataset's class count / boundary tolerance unless `options` say
    otherwise. `dataset` None: the metric's own defaults (semseg then needs `num_classes`)."""
    if task not in METRICS:
        raise ValueError(f"no metric for task {task!r}; known tasks: {', '.join(METRICS.names())}")
    defaults: dict = {}
    if dataset is not None:
        if dataset not in DATASET_OPTIONS:
            raise ValueError(f"unknown dataset {dataset!r} for metrics; known datasets: {', '.join(DATASET_OPTIONS)}")
        if task not in DATASET_OPTIONS[dataset]:
            raise ValueError(
                f"dataset {dataset!r} has no task {task!r}; its tasks: {', '.join(DATASET_OPTIONS[dataset])}"
            )
        defaults = DATASET_OPTIONS[dataset][task]
    cls = METRICS.get(task)
    accepted = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{task} metric: unknown option(s) {unknown}; accepted: {accepted or 'none'}")
    return cls(**{**defaults, **options})


def sync_metric(metric: Metric, accelerator) -> None:
    """Sum the metric's state over all processes (`accelerator.reduce(..., "sum")`); a no-op for one
    process. Exact when every sample was scored by exactly one process (non-padded shards)."""
    if getattr(accelerator, "num_processes", 1) <= 1:
        return
    device = getattr(accelerator, "device", "cpu")
    summed = {k: accelerator.reduce(v.to(device), reduction="sum").cpu() for k, v in metric.state().items()}
    metric.load_state(summed)


def delta_m(
    scores: dict[str, float], reference: dict[str, float], lower_is_better: Iterable[str] = LOWER_IS_BETTER
) -> float:
    """Mean over the tasks of `scores` of (-1)^l (M - M_ref) / M_ref x 100, l = 1 for the tasks in
    `lower_is_better` (docs/metrics.md), in percent. Every task of `scores` must be in `reference`."""
    if not scores:
        raise ValueError("delta_m: no task scores given")
    missing = sorted(set(scores) - set(reference))
    if missing:
        raise ValueError(f"delta_m: no reference value for task(s) {missing}; reference has {sorted(reference)}")
    lower = set(lower_is_better)
    gains = []
    for task, value in scores.items():
        sign = -1.0 if task in lower else 1.0
        gains.append(sign * (value - reference[task]) / reference[task] * 100)
    return sum(gains) / len(gains)


__all__ = [
    "DATASET_OPTIONS",
    "LOWER_IS_BETTER",
    "METRICS",
    "PUBLISHED",
    "SINGLE_TASK",
    "BoundaryF",
    "DepthRMSE",
    "MeanIoU",
    "Metric",
    "NormalsAngularError",
    "PartsMeanIoU",
    "PublishedRow",
    "SaliencyMaxF",
    "SemsegMeanIoU",
    "build_metric",
    "delta_m",
    "sync_metric",
]
