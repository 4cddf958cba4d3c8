"""Distillation losses that turn non-finite on cue, registered for the tests of the non-finite guard
(test_nonfinite.py) and of fp16 loss scaling (test_train.py)."""

import torch

from sak.registry import LOSSES


@LOSSES.register("test_nan_after_2")
class NanAfterTwo(torch.nn.Module):
    calls = 0

    def forward(self, student, teacher):
        NanAfterTwo.calls += 1
        loss = sum(s.float().mean() * 0 + 1 for s in student)
        return loss * float("nan") if NanAfterTwo.calls > 4 else loss  # two teachers per step


@LOSSES.register("test_nan_grad_at_3")
class NanGradientAtStepThree(torch.nn.Module):
    """A finite loss whose gradient is NaN at step 3 (as an overflow in backward): sqrt's gradient at 0."""

    calls = 0  # (each class counts its own)

    def nan_now(self) -> bool:
        return type(self).calls in (5, 6)  # two teachers per step

    def forward(self, student, teacher):
        type(self).calls += 1
        loss = sum(s.float().mean() for s in student)
        if self.nan_now():
            loss = loss + 0.0 * torch.sqrt((student[0] - student[0].detach()).abs().sum())
        return loss


@LOSSES.register("test_nan_grad_from_3")
class NanGradientFromStepThree(NanGradientAtStepThree):
    """A finite loss whose gradient is NaN at every step from step 3 on (a gradient no loss scale makes finite)."""

    calls = 0

    def nan_now(self) -> bool:
        return type(self).calls >= 5
