import math

import pytest
import torch

from sak.metrics import build_metric
from sak.metrics.saliency import saliency_thresholds


def test_thresholds_are_the_references_float32_range():
    t = saliency_thresholds()
    assert t.dtype == torch.float32 and len(t) == 19
    assert t[0].item() == pytest.approx(0.05) and t[-1].item() == pytest.approx(0.95)
    assert t[11].item() < 0.6  # torch's float32 range: 0.59999996, not float32(0.6)


def test_maxf_by_hand():
    # P / R per threshold band: (0.5, 1), (2/3, 1), (0.5, 0.5), (1, 0.5), none; F with beta^2 = 0.3
    metric = build_metric("saliency")
    pred = torch.tensor([0.9, 0.3, 0.6, 0.1, 0.99]).view(1, 1, 1, 5)
    target = torch.tensor([1.0, 1.0, 0.0, 0.0, 255.0]).view(1, 1, 1, 5)  # the 0.99 pixel is ignored
    metric.update(pred, target)
    out = metric.compute()
    assert out["maxF"] == pytest.approx(100 * 1.3 * 0.5 / (0.3 + 0.5))  # P = 1, R = 0.5
    assert out["threshold"] == pytest.approx(0.65)
    assert (out["precision"], out["recall"]) == pytest.approx((100.0, 50.0))


def test_k_over_255_on_a_threshold_counts_as_positive():
    # float32 k / 255 >= float32 threshold reproduces the exact rational test 20 k >= 255 (j + 1), ties
    # (k = 51, 102, 153, 204 on 0.2, 0.4, 0.6, 0.8) included; a strict ">" would drop them
    metric = build_metric("saliency")
    k = torch.arange(256)
    metric.update((k.float() / 255).view(1, 1, 16, 16), torch.ones(1, 1, 16, 16))
    expected = [int((20 * k >= 255 * (j + 1)).sum()) for j in range(19)]
    assert metric.state()["pred_pos"].tolist() == expected
    assert metric.state()["tp"].tolist() == expected


def test_empty_prediction_scores_zero_and_all_ignored_is_nan():
    metric = build_metric("saliency")
    metric.update(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4))
    assert metric.compute()["maxF"] == 0.0
    metric.reset()
    metric.update(torch.rand(1, 1, 4, 4), torch.full((1, 1, 4, 4), 255.0))
    with pytest.warns(RuntimeWarning):
        assert math.isnan(metric.compute()["maxF"])


def test_rejects_targets_that_are_not_binary():
    with pytest.raises(ValueError, match="0, 1 or 255"):
        build_metric("saliency").update(torch.rand(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5))


def test_rejects_logits():
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        build_metric("saliency").update(torch.randn(1, 1, 4, 4) * 5, torch.ones(1, 1, 4, 4))


def test_miou_is_the_per_image_iou_averaged_over_images_at_the_best_threshold():
    """SAK's SaliencyMeter also reports mIoU: the IoU of each image's thresholded map, averaged over images,
    maximum over thresholds (sak reported only maxF)."""
    rng = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 256, (3, 1, 12, 10), generator=rng).float() / 255
    target = (torch.rand(3, 1, 12, 10, generator=rng) < pred).float()
    target[1, :, :4] = 255
    metric = build_metric("saliency")
    metric.update(pred[:2], target[:2])
    metric.update(pred[2:], target[2:])
    per_threshold = []
    for t in saliency_thresholds():
        ious = []
        for p, g in zip(pred, target, strict=True):
            valid = g != 255
            above, positive = (p >= t)[valid], g[valid] == 1
            ious.append(float((above & positive).sum()) / float((above | positive).sum()))
        per_threshold.append(sum(ious) / len(ious))
    out = metric.compute()
    assert out["mIoU"] == pytest.approx(100 * max(per_threshold), abs=1e-9)
    best = max(range(19), key=lambda j: per_threshold[j])
    assert out["mIoU_threshold"] == pytest.approx(saliency_thresholds()[best].item())


def test_miou_counts_an_empty_union_as_agreement_and_leaves_unscored_images_out():
    metric = build_metric("saliency")
    pred = torch.tensor([[0.0, 0.0], [0.9, 0.9], [0.5, 0.5]]).view(3, 1, 1, 2)
    target = torch.tensor([[0.0, 0.0], [1.0, 0.0], [255.0, 255.0]]).view(3, 1, 1, 2)
    metric.update(pred, target)
    # image 1: nothing salient, nothing predicted (IoU 1 at every threshold); image 2: IoU 1/2 up to 0.9;
    # image 3: no valid pixel, left out
    assert metric.state()["images"].item() == 2
    assert metric.compute()["mIoU"] == pytest.approx(100 * (1 + 0.5) / 2)
