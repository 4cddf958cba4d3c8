import math

import numpy as np
import pytest
import torch

from sak.data.pascal_context import edges_from_label_map
from sak.metrics import build_metric


def _batch(*maps):
    return torch.from_numpy(np.stack(maps).astype(np.float32))[:, None]


def _scene(size=200):
    """Boundaries of a rectangle, a disc and a bar, as sak's PASCAL-Context loader makes them."""
    labels = np.zeros((size, size), dtype=np.int64)
    labels[40:120, 30:110] = 1
    yy, xx = np.mgrid[0:size, 0:size]
    labels[(yy - 120) ** 2 + (xx - 130) ** 2 < 45**2] = 2
    labels[150:185, 20:90] = 3
    return edges_from_label_map(labels)


def _line(shape=(64, 64), value=1.0):
    m = np.zeros(shape, dtype=np.float32)
    m[20:30, 32] = value
    return m


def _metric(**options):
    """Radius 1.5 px on 64 x 64 images, no NMS: every count can be done by hand."""
    return build_metric("edges", tolerance=1.5 / math.hypot(64, 64), nms=False, **options)


def test_counts_by_hand():
    gt = _line()
    pred = np.zeros_like(gt)
    pred[20:25, 32] = 1.0  # half the line
    pred[[2, 2, 60], [2, 60, 2]] = 1.0  # three isolated false positives
    metric = _metric()
    metric.update(_batch(pred), _batch(gt))
    assert metric.state()["counts"][0].tolist() == [5, 10, 5, 8]  # cntR, sumR, cntP, sumP
    r, p = 5 / 10, 5 / 8
    assert metric.compute()["odsF"] == pytest.approx(100 * 2 * p * r / (p + r))


def test_ods_and_ois_by_hand_and_independent_of_image_order():
    # A: the line at 0.3 -> F = 1 for t <= 0.30. B: the line at 0.8 plus 10 stray pixels at 0.5 ->
    # F = 2/3 for t <= 0.50, 1 for 0.50 < t <= 0.80. Dataset: (R, P) = (1, 2/3) for t <= 0.30 -> 80;
    # (0.5, 0.5) up to 0.50; (0.5, 1) up to 0.80. OIS: A at 0.01, B at 0.51 -> all matched, 100.
    a = _line(value=0.3)
    b = _line(value=0.8)
    b[5, 2:60:6] = 0.5
    gt = _line()
    results = []
    for order in ((a, b), (b, a)):
        metric = _metric()
        for pred in order:
            metric.update(_batch(pred), _batch(gt))
        results.append(metric.compute())
    assert results[0] == results[1]
    out = results[0]
    assert out["odsF"] == pytest.approx(80.0)
    assert out["odsT"] == pytest.approx(0.01)
    assert (out["oisF"], out["oisP"], out["oisR"]) == pytest.approx((100.0, 100.0, 100.0))


def test_identical_maps_score_100():
    gt = _scene()
    metric = build_metric("edges", "pascal_context", nms=False)
    metric.update(_batch(gt), _batch(gt))
    assert metric.compute()["odsF"] == pytest.approx(100.0)
    with_nms = build_metric("edges", "pascal_context")  # NMS loses a few corner pixels
    with_nms.update(_batch(gt), _batch(gt))
    assert with_nms.compute()["odsF"] > 99.0


@pytest.mark.parametrize("shift", [(1, 0), (1, 1)])
def test_one_pixel_shift_is_within_the_tolerance(shift):
    gt = _scene()  # 200 x 200: 0.0075 x diagonal = 2.1 px
    metric = build_metric("edges", "pascal_context")
    metric.update(_batch(np.roll(gt, shift, axis=(0, 1))), _batch(gt))
    assert metric.compute()["odsF"] > 95.0


def test_ten_pixel_shift_scores_low():
    gt = _scene()
    metric = build_metric("edges", "pascal_context")
    metric.update(_batch(np.roll(gt, (10, 10), axis=(0, 1))), _batch(gt))
    assert metric.compute()["odsF"] < 20.0


def test_tolerance_follows_the_dataset():
    gt = _scene()
    pred = np.roll(gt, (2, 2), axis=(0, 1))  # 2.8 px: beyond 0.0075 x 283, within 0.011 x 283
    scores = {}
    for dataset in ("pascal_context", "nyud"):
        metric = build_metric("edges", dataset, nms=False)
        metric.update(_batch(pred), _batch(gt))
        scores[dataset] = metric.compute()["odsF"]
    assert scores["nyud"] == pytest.approx(100.0) and scores["pascal_context"] < 95.0


def test_empty_prediction_scores_zero():
    metric = build_metric("edges", "pascal_context")
    metric.update(_batch(np.zeros((50, 50))), _batch(_line((50, 50))))
    out = metric.compute()
    assert (out["odsF"], out["oisF"]) == (0.0, 0.0)
    assert metric.state()["counts"][:, 3].sum() == 0  # nothing predicted


def test_ignored_pixels_count_neither_way():
    gt = _line()
    pred = _line()
    pred[50, 50] = 1.0  # a false positive ...
    target = gt.copy()
    target[48:53, 48:53] = 255  # ... inside an ignored region
    metric = _metric()
    metric.update(_batch(pred), _batch(target))
    assert metric.compute()["odsF"] == pytest.approx(100.0)


def test_rejects_logits():
    with pytest.raises(ValueError, match="probabilities"):
        _metric().update(_batch(np.full((8, 8), 3.0)), _batch(np.zeros((8, 8))))


def test_no_image_gives_nan_with_a_warning():
    with pytest.warns(RuntimeWarning, match="no image"):
        assert math.isnan(build_metric("edges").compute()["odsF"])
    metric = _metric()  # images whose every pixel is ignored: nothing scored, as the other tasks (it said 0.0)
    metric.update(_batch(_line()), _batch(np.full((64, 64), 255)))
    with pytest.warns(RuntimeWarning, match="no image with a labelled pixel"):
        assert math.isnan(metric.compute()["odsF"])


def test_blurred_boundaries_of_a_512_image_score_high():
    """Blurred boundaries make the layered graphs on which scipy's maximum_bipartite_matching took minutes; the
    max flow scores them (its time per image: benchmarks/results/edge_metric_cpu.md)."""
    from benchmarks.edge_metric import as_batch, blurred_boundaries

    pred, gt = blurred_boundaries((512, 512))
    metric = build_metric("edges", "pascal_context")
    metric.update(as_batch(pred), as_batch(gt))
    assert metric.compute()["odsF"] > 90.0
