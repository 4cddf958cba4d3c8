import math

import pytest
import torch

from sak.metrics import build_metric


def test_rmse_by_hand_with_invalid_target_and_negative_prediction():
    metric = build_metric("depth", "nyud")
    metric.update(torch.tensor([[[1.0, 3.0, 5.0, -1.0]]]), torch.tensor([[[2.0, 3.0, 0.0, 4.0]]]))
    # valid: target > 0; a prediction <= 0 becomes 1e-9 -> errors 1, 0, ~4
    assert metric.compute()["rmse"] == pytest.approx(math.sqrt(17 / 3))


def test_rmse_is_over_the_dataset_not_a_mean_of_images():
    metric = build_metric("depth")
    metric.update(torch.full((1, 1, 1, 2), 2.0), torch.ones(1, 1, 1, 2))  # squared errors 1, 1
    metric.update(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))  # perfect
    out = metric.compute()
    assert out["rmse"] == pytest.approx(math.sqrt(2 / 6))
    assert out["rmse_per_image"] == pytest.approx((1.0 + 0.0) / 2)
    assert out["log_rmse"] == pytest.approx(math.sqrt(2 * math.log(2) ** 2 / 6))


def test_max_depth_and_no_valid_pixel():
    metric = build_metric("depth", max_depth=3.0)
    metric.update(torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[5.0, 0.0]]]))
    with pytest.warns(RuntimeWarning, match="no valid depth"):
        assert math.isnan(metric.compute()["rmse"])
