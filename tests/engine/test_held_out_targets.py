"""The teachers' outputs on the held-out images are kept from a run's first evaluation for its later ones."""

import json

import pytest

import sak.engine.evaluate as evaluate_module
from sak.engine import train
from sak.engine.build import build_loader


def held_out_batches(recipe) -> int:
    return len(build_loader(recipe, recipe.eval.split, train=False, batch_size=recipe.eval.batch_size))


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("normalize", ["none", "phi_s"])
def test_later_evaluations_reuse_the_teachers_outputs_and_score_the_same(tiny_recipe, monkeypatch, normalize):
    """Fixed crops, frozen teachers: the outputs of the first evaluation serve the later ones (the teachers ran
    again at every evaluation, most of its time); every logged metric is what running them again gives."""
    calls = []
    real = evaluate_module.teacher_targets
    monkeypatch.setattr(evaluate_module, "teacher_targets", lambda *a: calls.append(1) or real(*a))
    common = ["schedule.max_steps=4", "eval.every=1", "eval.at_start=true", "data.options.length=12",
              f"loss.normalize={normalize}"]  # fmt: skip
    kept = tiny_recipe("run.name=kept", *common)
    train(kept)
    batches = held_out_batches(kept)
    assert len(calls) == batches > 1  # the first evaluation's only
    again = tiny_recipe("run.name=again", *common, "eval.keep_targets_gib=0")
    train(again)
    assert len(calls) - batches == 5 * batches  # at the start, after steps 1-3, and the final one: each ran them
    a, b = metrics(kept.run_dir), metrics(again.run_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert {k: v for k, v in x.items() if k.startswith("val/")} == {
            k: v for k, v in y.items() if k.startswith("val/")
        }


def test_batches_past_the_budget_run_the_teachers_each_time(tiny_recipe, monkeypatch):
    calls = []
    real = evaluate_module.teacher_targets
    monkeypatch.setattr(evaluate_module, "teacher_targets", lambda *a: calls.append(1) or real(*a))
    # 1e-4 GiB (107 KB) holds one batch of the tiny teachers' outputs (4 images: about 92 KB), not two
    recipe = tiny_recipe("schedule.max_steps=2", "eval.every=1", "data.options.length=12", "eval.keep_targets_gib=1e-4")
    train(recipe)  # evaluations after step 1 and at the end
    batches = held_out_batches(recipe)
    assert len(calls) == batches + (batches - 1)
