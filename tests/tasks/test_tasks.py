"""Task losses against hand-computed values, including ignore handling."""

import math

import numpy as np
import pytest
import torch

from sak.tasks import create_task
from sak.tasks.dense import balanced_bce


def bce(logit, y):
    p = 1 / (1 + math.exp(-logit))
    return -math.log(p) if y else -math.log(1 - p)


def test_edges_balanced_bce_uses_fixed_positive_weight_and_ignores_255():
    logits = torch.tensor([[[[0.0, 2.0, -1.0]]]])
    target = torch.tensor([[[[1.0, 0.0, 255.0]]]])
    expected = (0.95 * bce(0.0, 1) + 0.05 * bce(2.0, 0)) / 2
    assert create_task("edges").loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert create_task("edges").weight == 50


def test_balanced_bce_with_batch_weight_uses_the_share_of_negatives():
    logits = torch.tensor([[[[1.0, -1.0, 0.5, 0.0]]]])
    target = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    w = 3 / 4
    expected = (w * bce(1.0, 1) + (1 - w) * (bce(-1.0, 0) + bce(0.5, 0) + bce(0.0, 0))) / 4
    assert balanced_bce(logits, target, None).item() == pytest.approx(expected, rel=1e-6)


def test_saliency_is_a_two_class_ce_weighted_by_the_share_of_negatives():
    # pixel logits (class 0, class 1); labels 1, 0, 0, 255 -> 1 positive, 2 negatives valid: w = 2/3
    logits = torch.tensor([[[[0.0, 1.0, 0.0, 5.0]], [[1.0, 0.0, 0.0, 5.0]]]])
    target = torch.tensor([[[[1.0, 0.0, 0.0, 255.0]]]])
    ce = [-math.log(math.e / (1 + math.e)), -math.log(math.e / (1 + math.e)), math.log(2)]
    w = 2 / 3
    expected = (w * ce[0] + (1 - w) * (ce[1] + ce[2])) / 3
    task = create_task("saliency")
    assert task.channels == 2 and task.weight == 5
    assert task.loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert task.predict(logits).shape == (1, 1, 1, 4)


def test_normals_l1_on_normalised_prediction_summed_over_channels_per_valid_pixel():
    logits = torch.tensor([[[[2.0, 5.0]], [[0.0, 5.0]], [[0.0, 5.0]]]])  # pixel 0 -> (1, 0, 0)
    target = torch.tensor([[[[0.0, 0.0]], [[1.0, 0.0]], [[0.0, 0.0]]]])  # pixel 0 = (0, 1, 0); pixel 1 ignored
    assert create_task("normals").loss(logits, target).item() == pytest.approx(2.0)


def test_segmentation_ce_ignores_255_and_all_ignored_batches_give_zero_with_a_graph():
    logits = torch.zeros(1, 7, 1, 2, requires_grad=True)
    target = torch.tensor([[[3, 255]]])
    assert create_task("parts").loss(logits, target).item() == pytest.approx(math.log(7))
    empty = create_task("parts").loss(logits, torch.full((1, 1, 2), 255))
    assert empty.item() == 0 and empty.requires_grad
    assert create_task("parts").weight == 2 and create_task("semseg").channels == 21


def test_depth_l1_on_valid_pixels():
    logits = torch.tensor([[[[1.0, 2.0, 9.0]]]])
    target = torch.tensor([[[[1.5, 1.0, 0.0]]]])
    assert create_task("depth").loss(logits, target).item() == pytest.approx((0.5 + 1.0) / 2)


@pytest.mark.parametrize("name", ["depth", "normals"])
def test_a_regression_target_of_another_shape_is_an_error_not_a_broadcast(name):
    """A (B, H, W) depth map against (B, 1, H, W) predictions broadcast to (B, B, H, W): every image's
    prediction compared with every target, silently."""
    channels = 3 if name == "normals" else 1
    logits = torch.randn(2, channels, 4, 4)
    with pytest.raises(ValueError, match=r"dense target of shape \(2, 4, 4\) for predictions of shape \(2, "):
        create_task(name).loss(logits, torch.rand(2, 4, 4) + 0.1)


@pytest.mark.parametrize("name", ["semseg", "saliency", "edges", "normals", "depth"])
def test_a_batch_without_valid_pixels_gives_zero_with_zero_gradients(name):
    """Every task loss handles an all-ignored batch without asking the host (see sak/tasks/dense.py)."""
    task = create_task(name)
    channels = {"semseg": 21, "saliency": 2, "normals": 3}.get(name, 1)
    logits = torch.randn(2, channels, 4, 4, requires_grad=True)
    target = {
        "semseg": torch.full((2, 4, 4), 255),
        "saliency": torch.full((2, 1, 4, 4), 255.0),
        "edges": torch.full((2, 1, 4, 4), 255.0),
        "normals": torch.zeros(2, 3, 4, 4),  # all-zero normals = ignore
        "depth": torch.zeros(2, 1, 4, 4),  # depth 0 = ignore
    }[name]
    loss = task.loss(logits, target)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all() and not logits.grad.any()


def test_a_training_step_never_makes_the_host_wait_for_the_device():
    """Teachers, student, every task loss, backward and optimiser of a stage-2 step: no value read back
    (`.item()`, `if tensor`), no data-sized output, no tensor made from Python data; on a GPU each would
    stall the launch queue (counted by benchmarks/profile_gpu.py, here on the CPU)."""
    from benchmarks.profile_gpu import profile_recipe
    from tests.conftest import TESTS

    result = profile_recipe(str(TESTS / "tiny_multitask.yaml"), 1, ["data.num_workers=0"], "", 0, torch.device("cpu"))
    assert len(result["phases"]) == 6
    assert {p["phase"]: p["host_syncs"] for p in result["phases"]} == {p["phase"]: {} for p in result["phases"]}


def test_depth_predictions_are_never_negative_and_score_as_the_raw_output():
    from sak.metrics import build_metric

    logits = torch.tensor([[[[-0.5, 0.0], [1.0, 2.5]]]])
    pred = create_task("depth").predict(logits)
    assert pred.tolist() == [[[[0.0, 0.0], [1.0, 2.5]]]]
    # a diverged head's -inf is not turned into a depth of 0 (the writers and the metric refuse it, naming the image)
    assert create_task("depth").predict(torch.tensor([-math.inf, math.nan, -1.0])).tolist()[0] == -math.inf
    target = torch.tensor([[[[1.0, 2.0], [0.0, 2.0]]]])
    raw, clamped = build_metric("depth", "nyud"), build_metric("depth", "nyud")
    raw.update(logits, target)
    clamped.update(pred, target)
    assert raw.compute() == clamped.compute()


def test_a_label_the_head_has_no_channel_for_is_named():
    """Checked per sample in the loader: cross-entropy raised a bare "Target 4 is out of bounds" on the CPU (a
    device-side assert on a GPU); saliency's .long() turned a grey level 0.7 into background without a word."""
    semseg = create_task("semseg", channels=4)
    assert semseg.target_problem(torch.tensor([[0, 3], [255, 1]])) is None
    assert semseg.target_problem(torch.tensor([[0, 6], [6, 255]])) == (
        "its target holds the value 6 (2 pixel(s)), and the semseg head has 4 channel(s) (tasks[].channels), "
        "for classes 0..3 (255 ignored)"
    )
    assert "the value -1 " in semseg.target_problem(torch.tensor([[-1, 0]]))
    saliency = create_task("saliency")
    assert saliency.target_problem(torch.tensor([[[0.0, 1.0], [255.0, 1.0]]])) is None
    assert saliency.target_problem(torch.tensor([[[0.0, 0.7]]])).startswith("its target holds the value 0.7 (1 ")
    assert create_task("depth").target_problem(torch.full((1, 2, 2), 7.5)) is None  # (not checked)
    # not a tensor, or not (H, W): an AttributeError in the check, or cross-entropy's "only batches of spatial
    # targets supported", before
    assert semseg.target_problem(np.zeros((4, 4))) == (
        "its target is a ndarray, not a tensor ((H, W) class indices; sak.data.transforms.to_tensors)"
    )
    assert semseg.target_problem(torch.zeros(1, 4, 4, dtype=torch.long)) == (
        "its target is (1, 4, 4), not (H, W) class indices"
    )


def test_training_on_labels_beyond_the_heads_channels_names_the_sample(tiny_recipe):
    from sak.data.images import DataError
    from sak.engine import train

    from ..conftest import TESTS

    recipe = tiny_recipe(
        "tasks=[{name: semseg, channels: 3}]", "schedule.max_steps=1", path=TESTS / "tiny_multitask.yaml"
    )
    with pytest.raises(
        DataError, match=r"SyntheticDataset sample 'train_\d+': semseg: its target holds the value [34] "
    ):
        train(recipe)
