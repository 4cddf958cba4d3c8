import math

import pytest
import torch

from sak.metrics import build_metric


def _pixels(vectors):
    """[(x, y, z), ...] -> (1, 3, 1, N)"""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, 3, 1, -1)


def test_mean_angle_by_hand():
    pred = _pixels([(1, 0, 0), (1, 1, 0), (0, 0, 2), (5, 5, 5)])  # not unit length
    target = _pixels([(0, 1, 0), (1, 0, 0), (0, 0, 1), (0, 0, 0)])  # the last is ignored
    metric = build_metric("normals", "pascal_context")
    metric.update(pred, target)
    out = metric.compute()
    assert out["mErr"] == pytest.approx(45.0)  # (90 + 45 + 0) / 3
    assert out["rmse"] == pytest.approx(math.sqrt((90**2 + 45**2) / 3))
    assert (out["11.25"], out["22.5"], out["30"]) == pytest.approx((100 / 3, 100 / 3, 100 / 3))


def test_opposite_and_zero_predictions():
    metric = build_metric("normals")
    metric.update(_pixels([(-1, 0, 0), (0, 0, 0)]), _pixels([(1, 0, 0), (0, 1, 0)]))
    assert metric.compute()["mErr"] == pytest.approx((180 + 90) / 2)  # a zero vector is 90 degrees off


def test_reference_ignore_value_and_all_ignored():
    metric = build_metric("normals")
    metric.update(_pixels([(1, 0, 0)]), _pixels([(255, 255, 255)]))
    with pytest.warns(RuntimeWarning, match="no valid normal"):
        assert math.isnan(metric.compute()["mErr"])


def test_rejects_single_channel_predictions():
    with pytest.raises(ValueError, match=r"\(1, 1, 2, 2\).*\(1, 3, 2, 2\)"):
        build_metric("normals").update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 3, 2, 2))
