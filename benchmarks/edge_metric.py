"""How long the edge metric (odsF / oisF over 99 thresholds) takes per image on this CPU.

    python -m benchmarks.edge_metric [--repeats 5]

Synthetic scenes: a dozen overlapping rectangles, their one-sided boundaries (`edges_from_label_map`, as the
PASCAL-Context loader makes them) as ground truth, and a blurred copy with a little noise as the prediction.
Blurred boundaries give the layered matching graphs on which scipy's `maximum_bipartite_matching` took
minutes per image (scipy issue #26147, the reason `match_count` runs a max flow instead). One row per
dataset's image size and tolerance: PASCAL-Context 512 x 512 at 0.0075, NYUD-v2 448 x 576 at 0.011. Each
row: the median of `--repeats` timed `update` calls of one image (after one untimed call), and the odsF it
scores. Writes benchmarks/results/edge_metric_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from sak.data.pascal_context import edges_from_label_map
from sak.metrics import build_metric

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {"pascal_context": (512, 512), "nyud": (448, 576)}


def blurred_boundaries(shape: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, ground truth) float maps of `shape`: the boundaries of 12 random rectangles, and those
    boundaries blurred (sigma 1.5 px), scaled, with uniform noise, quantised to 8 bits."""
    rng = np.random.default_rng(seed)
    h, w = shape
    labels = np.zeros(shape, dtype=np.int64)
    for i in range(12):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        labels[y0 : y0 + rng.integers(20, 200), x0 : x0 + rng.integers(20, 200)] = i + 1
    gt = edges_from_label_map(labels)
    pred = np.floor(np.clip(ndimage.gaussian_filter(gt, 1.5) * 4 + 0.05 * rng.random(gt.shape), 0, 1) * 255) / 255
    return pred, gt


def as_batch(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32))[None, None]


def time_case(dataset: str, shape: tuple[int, int], repeats: int) -> dict:
    pred, gt = blurred_boundaries(shape)
    build_metric("edges", dataset).update(as_batch(pred), as_batch(gt))  # untimed: imports and first calls
    seconds = []
    for _ in range(repeats):
        metric = build_metric("edges", dataset)
        start = time.perf_counter()
        metric.update(as_batch(pred), as_batch(gt))
        seconds.append(time.perf_counter() - start)
    return {"dataset": dataset, "shape": list(shape), "median_s": statistics.median(seconds), "seconds": seconds,
            "odsF": metric.compute()["odsF"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder the JSON and markdown go to")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    rows = [time_case(dataset, shape, args.repeats) for dataset, shape in CASES.items()]
    command = "python -m benchmarks.edge_metric " + " ".join(argv if argv is not None else sys.argv[1:])
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "edge_metric_cpu.json").write_text(json.dumps({"command": command.strip(), "rows": rows}, indent=2))
    lines = [
        "# Edge metric: time per image (CPU)",
        "",
        f"Command: `{command.strip()}`; synthetic blurred boundaries (see the module docstring); median of "
        f"{args.repeats} `update` calls of one image, 99 thresholds, single-threaded numpy / scipy.",
        "",
        "| dataset (tolerance) | image | seconds per image | odsF |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        tolerance = build_metric("edges", r["dataset"]).tolerance
        h, w = r["shape"]
        lines.append(f"| {r['dataset']} ({tolerance}) | {h} x {w} | {r['median_s']:.3f} | {r['odsF']:.2f} |")
    (args.results / "edge_metric_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
