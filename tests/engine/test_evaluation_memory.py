"""What a training step leaves alive while the run evaluates."""

import sys

import sak.engine.trainer as trainer_module
from sak.engine import train


def test_the_last_steps_targets_and_outputs_are_freed_before_an_evaluation(tiny_recipe, monkeypatch):
    """The step's targets, student outputs (with their autograd graph) and losses stayed referenced by the
    training loop through each evaluation and checkpoint save: one batch's worth of memory on top of the
    evaluation's peak."""
    alive = []
    real = trainer_module.evaluate

    def spying(*args, **kwargs):
        loop = sys._getframe(1)  # evaluate <- ... <- evaluate_now <- train
        while loop.f_code.co_name != "train":
            loop = loop.f_back
        alive.append({"targets", "out", "losses", "scalars", "logged"} & set(loop.f_locals))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate", spying)
    train(tiny_recipe("schedule.max_steps=2", "eval.every=1"))
    assert alive == [set(), set()]  # after step 1, and the final evaluation
