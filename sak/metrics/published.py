"""Published results that `sak` is compared against (SAK, Lu, Cao & Wang, ICLR 2025,
arXiv 2410.14633, Table 5 for PASCAL-Context and the NYUD-v2 table; ViT-L students unless named).

Units are the metrics' headline units: semseg / parts mIoU, saliency maxF and edges odsF in percent,
normals mErr in degrees, depth RMSE in metres. `params_m` is millions of parameters (None where the
paper's table gives none), `delta_m` the published multi-task gain in percent.

NYUD-v2's delta_m is the mean over all four tasks, boundaries included: the published per-task numbers
give +14.047 for SAK and +8.954 for RADIO with edges (printed +14.05 / +8.95), +18.16 / +11.38 without.
The ViT-B SAK row's +0.83 is relative to ViT-B single-task baselines not stored here (against
the ViT-L single-task row its numbers give +0.20), so it cannot be recomputed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOWER_IS_BETTER = ("normals", "depth")  # mErr, RMSE


@dataclass(frozen=True)
class PublishedRow:
    scores: dict[str, float]  # task -> headline value
    params_m: float | None = None
    delta_m: float | None = None
    note: str = field(default="", compare=False)


def _row(scores: dict[str, float], params_m: float | None = None, delta_m: float | None = None, note: str = ""):
    return PublishedRow(dict(scores), params_m, delta_m, note)


SIGMOID_MAXF = "saliency maxF by its own code's meter, which thresholds sigmoid(p), not p (docs/metrics.md)"
# MLoRE's evaluation is InvPT's (its evaluate_utils.py builds InvPT's SaliencyMeter(ignore_index, threshold_step,
# beta_squared)); its eval_sal.py itself was not at hand to read
LIKELY_SIGMOID_MAXF = (
    "saliency maxF by its own code, built on InvPT's, whose meter thresholds sigmoid(p), not p: likely the same "
    "(not checked; docs/metrics.md)"
)


def _pascal(semseg: float, parts: float, saliency: float, normals: float, edges: float) -> dict[str, float]:
    return {"semseg": semseg, "parts": parts, "saliency": saliency, "normals": normals, "edges": edges}


def _nyud(semseg: float, depth: float, normals: float, edges: float) -> dict[str, float]:
    return {"semseg": semseg, "depth": depth, "normals": normals, "edges": edges}


PUBLISHED: dict[str, dict[str, PublishedRow]] = {
    "pascal_context": {
        "single-task": _row(_pascal(81.61, 72.77, 83.80, 13.87, 75.24), 1573, 0.00),
        "MT baseline": _row(_pascal(79.26, 68.28, 84.16, 14.06, 71.59), 357, -2.97),
        "InvPT": _row(_pascal(79.03, 67.61, 84.81, 14.15, 73.00), 423, -2.81, note=SIGMOID_MAXF),
        "TaskPrompter": _row(_pascal(80.89, 68.89, 84.83, 13.72, 73.50), 401, -1.24, note=SIGMOID_MAXF),
        "MLoRE": _row(_pascal(81.41, 70.52, 84.90, 13.51, 75.42), 407, +0.16, note=LIKELY_SIGMOID_MAXF),
        "RADIO": _row(_pascal(81.11, 71.50, 85.17, 13.49, 74.80), 372, +0.29),
        "SAK ViT-L": _row(_pascal(84.01, 76.99, 84.65, 13.82, 76.27), 407, +2.30),
        "SAK ViT-B": _row(
            _pascal(81.88, 74.30, 84.79, 14.02, 74.09),
            None,
            +0.83,
            note="delta_m relative to ViT-B single-task baselines (not listed)",
        ),
    },
    "nyud": {
        "single-task": _row(_nyud(54.19, 0.5560, 19.22, 78.09), None, 0.00),
        "RADIO": _row(_nyud(59.32, 0.4698, 17.46, 79.41), None, +8.95),
        "SAK ViT-L": _row(_nyud(63.18, 0.4313, 16.25, 79.43), None, +14.05),
    },
}

# The delta_m references: the single-task ViT-L baselines of each dataset.
SINGLE_TASK: dict[str, dict[str, float]] = {dataset: rows["single-task"].scores for dataset, rows in PUBLISHED.items()}
