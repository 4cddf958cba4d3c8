"""What a skipped step and the stop after too many say of a non-finite loss's source: a teacher's output or the
images, looked for again at the skip, else the learning rate and clipping."""

import pytest
import torch

from sak.engine import train
from sak.engine.trainer import NonFiniteLossError
from sak.teachers.timm_teacher import TimmTeacher

from .test_train import NanAfterTwo


def test_a_teacher_giving_nan_is_named_not_blamed_on_the_learning_rate(tiny_recipe, monkeypatch, capsys):
    """A plug-in (here: the tiny vit_b) whose output is NaN: the stop said "lower optim.lr, enable optim.grad_clip or
    check the data", where `sak cache build` on the same teacher named it."""
    forward = TimmTeacher.forward

    def nan_for_vit_b(self, x):
        out = forward(self, x)
        if self.meta.embed_dim != 40:  # (vit_a's 48 channels stay finite)
            return out
        return type(out)(tuple(t * float("nan") for t in out.levels), out.summary)

    monkeypatch.setattr(TimmTeacher, "forward", nan_for_vit_b)
    with pytest.raises(NonFiniteLossError) as info:
        train(tiny_recipe("optim.max_nonfinite=2"))
    assert str(info.value).endswith(
        "; teacher 'vit_b' level 0 gives a non-finite value for the batch's images (check the teacher, its weights "
        "and precision.teachers)."
    )
    assert "step 1: non-finite loss nan or gradient norm" in capsys.readouterr().out


def test_a_non_finite_loss_of_finite_targets_points_at_the_learning_rate(tiny_recipe):
    NanAfterTwo.calls = 0
    with pytest.raises(NonFiniteLossError, match=r"\(lower optim.lr, enable optim.grad_clip or check the data\)\.$"):
        train(tiny_recipe("loss.distill=test_nan_after_2", "optim.max_nonfinite=2"))


def test_images_with_a_non_finite_value_are_named():
    """Float images (a plug-in dataset's) with an inf: named before any teacher runs on them."""
    from sak.engine.step import nonfinite_cause

    images = torch.rand(2, 3, 8, 8)
    assert nonfinite_cause({}, images, None) == ""
    images[1, 0, 2, 2] = float("inf")
    assert nonfinite_cause({}, images, None) == "; the batch's images hold a non-finite value (check the data)"
