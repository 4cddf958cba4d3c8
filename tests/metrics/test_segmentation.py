import math

import pytest
import torch

from sak.metrics import build_metric

# target / prediction of the hand example: 3 classes, one ignored pixel (whose prediction must not count)
TARGET = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
PRED = torch.tensor([[[0, 1, 1], [1, 0, 2]]])
# class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: fn 1 -> 0


def test_miou_by_hand():
    metric = build_metric("semseg", num_classes=3)
    metric.update(PRED, TARGET)
    out = metric.compute()
    assert out["mIoU"] == pytest.approx(100 / 3)
    assert [out[f"IoU/{i}"] for i in range(3)] == pytest.approx([100 / 3, 200 / 3, 0.0])
    assert out["pixel_acc"] == pytest.approx(60.0)


def test_accepts_a_channel_dim_and_float_class_indices():
    metric = build_metric("semseg", num_classes=3)
    metric.update(PRED[:, None].float(), TARGET[:, None])
    assert metric.compute()["mIoU"] == pytest.approx(100 / 3)


def test_a_class_absent_from_target_and_prediction_counts_as_zero_like_the_reference():
    metric = build_metric("semseg", num_classes=4)
    metric.update(PRED, TARGET)
    out = metric.compute()
    assert out["IoU/3"] == 0.0
    assert out["mIoU"] == pytest.approx(100 / 4)  # (1/3 + 2/3 + 0 + 0) / 4
    assert out["mIoU_present"] == pytest.approx(100 / 3)


def test_all_pixels_ignored_gives_nan_with_a_warning():
    metric = build_metric("parts", "pascal_context")
    metric.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.full((2, 4, 4), 255))
    with pytest.warns(RuntimeWarning, match="no labelled pixel"):
        out = metric.compute()
    assert math.isnan(out["mIoU"])


def test_parts_images_without_people_do_not_change_the_score():
    metric = build_metric("parts", "pascal_context")
    metric.update(PRED, TARGET)
    before = metric.compute()["mIoU"]
    metric.update(torch.randint(0, 7, (1, 4, 4)), torch.full((1, 4, 4), 255))  # all-ignore image
    assert metric.compute()["mIoU"] == before


def test_rejects_classes_out_of_range_and_logits():
    metric = build_metric("semseg", num_classes=3)
    with pytest.raises(ValueError, match=r"prediction holds class\(es\) \[5\]"):
        metric.update(torch.tensor([[[5]]]), torch.tensor([[[0]]]))
    with pytest.raises(ValueError, match=r"target holds class\(es\) \[7\]"):
        metric.update(torch.tensor([[[0]]]), torch.tensor([[[7]]]))
    with pytest.raises(ValueError, match="non-integer"):
        metric.update(torch.tensor([[[0.5]]]), torch.tensor([[[0]]]))
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 4, 4\)"):
        metric.update(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))


@pytest.mark.parametrize("task", ["semseg", "parts"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_nan_or_infinite_prediction_is_refused_counting_them(task, bad):
    """As docs/metrics.md says of every metric: a NaN read as "non-integer values", an inf as a class out of
    range (its int64 cast), and nothing was scored of the batch either way."""
    metric = build_metric(task, num_classes=3)
    pred = PRED.float()
    pred[0, 0, :2] = bad
    with pytest.raises(ValueError, match=rf"{task}: 2 prediction value\(s\) are NaN or infinite"):
        metric.update(pred, TARGET)
    metric.update(PRED, TARGET)  # nothing of the refused batch was counted
    assert metric.compute()["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 0) / 3)
