"""The non-finite guard: a step whose loss or gradient norm is NaN or infinite is skipped and logged, too many in
a row stop the run keeping the last good checkpoint, and what the skip and the stop say of the source: a
teacher's output or the images, looked for again at the skip, else the learning rate and clipping."""

import math

import pytest
import torch

from sak.engine import NonFiniteLossError, train
from sak.engine.checkpoint import latest_checkpoint
from sak.teachers.timm_teacher import TimmTeacher

from ..conftest import TESTS
from .nan_losses import NanAfterTwo, NanGradientAtStepThree
from .test_train import logged, weights


def test_nonfinite_guard_skips_steps_then_stops_keeping_last_checkpoint(tiny_recipe):
    NanAfterTwo.calls = 0
    recipe = tiny_recipe("loss.distill=test_nan_after_2", "checkpoint.every=2", "optim.max_nonfinite=3")
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses or gradient norms at step 5") as info:
        train(recipe)
    assert "step_00000002" in str(info.value)
    assert latest_checkpoint(recipe.run_dir / "checkpoints").name == "step_00000002"
    streaks = logged(recipe.run_dir, "nonfinite_streak")
    assert streaks[3] == 1 and streaks[5] == 3


def test_a_skipped_step_leaves_the_heads_batch_norm_statistics_as_they_were(tiny_recipe, monkeypatch):
    """An inf reaching a head's batch norm at step 3 (an overflow upstream) skipped the step but left the running
    mean inf and the variance NaN: the next steps' losses, on batch statistics, were finite, and every checkpoint
    and evaluation after carried the damage (NaN validation losses)."""
    from sak.engine import build

    real = build.build_student
    calls = {"n": 0}

    def student_with_an_overflow(*args, **kwargs):
        student = real(*args, **kwargs)
        norm = next(m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d))

        def overflow(module, inputs):
            calls["n"] += module.training
            return (inputs[0] * float("inf"),) if module.training and calls["n"] == 3 else None

        norm.register_forward_pre_hook(overflow)
        return student

    monkeypatch.setattr(build, "build_student", student_with_an_overflow)
    recipe = tiny_recipe("schedule.max_steps=5", "eval.batches=1", path=TESTS / "tiny_multitask.yaml")
    final = train(recipe)
    assert [logged(recipe.run_dir, "nonfinite_streak")[k] for k in range(1, 6)] == [0, 0, 1, 0, 0]
    state = weights(recipe.run_dir)
    running = {k: v for k, v in state.items() if "running_" in k}
    assert running and all(torch.isfinite(v).all() for v in running.values())
    tracked = [v.item() for k, v in state.items() if k.endswith("num_batches_tracked")]
    assert set(tracked) == {4}  # the 4 steps taken; the skipped one not counted
    assert math.isfinite(final["val/loss"])


@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_finite_loss_with_a_nan_gradient_is_skipped_not_stepped_into_the_weights(tiny_recipe, clip):
    """The skip looked at the loss only: AdamW stepped the NaN gradient, the step's checkpoint was kept as good
    and pruning deleted the good ones before it."""
    NanGradientAtStepThree.calls = 0
    recipe = tiny_recipe("loss.distill=test_nan_grad_at_3", "schedule.max_steps=5", "checkpoint.every=1",
                         "checkpoint.keep_last=1", f"optim.grad_clip={'null' if clip is None else clip}")  # fmt: skip
    train(recipe)
    streaks, norms = logged(recipe.run_dir, "nonfinite_streak"), logged(recipe.run_dir, "grad_norm")
    assert [streaks[k] for k in range(1, 6)] == [0, 0, 1, 0, 0]
    assert norms[3] is None and all(math.isfinite(norms[k]) for k in (1, 2, 4, 5))  # NaN is written as null
    assert all(torch.isfinite(t).all() for t in weights(recipe.run_dir).values())


def test_a_skipped_step_uses_up_its_place_in_the_lr_schedule(tiny_recipe):
    """The schedule was stepped only when the optimiser was: each skip held it back a step, so a run ended
    short of its floor (the official loops step it by iteration). A skipped step uses up its lr."""
    NanGradientAtStepThree.calls = 0
    common = ["schedule.max_steps=6", "schedule.warmup_steps=4", "schedule.name=cosine"]
    skipping = tiny_recipe("run.name=skipping", "loss.distill=test_nan_grad_at_3", *common)
    train(skipping)
    clean = tiny_recipe("run.name=clean", *common)
    train(clean)
    assert logged(skipping.run_dir, "nonfinite_streak")[3] == 1
    lrs = logged(clean.run_dir, "lr")
    assert lrs[3] < lrs[4] and logged(skipping.run_dir, "lr") == lrs  # (step 4's was step 3's)


def test_stopping_in_a_nonfinite_streak_says_no_checkpoint_was_written(tiny_recipe, capsys):
    NanAfterTwo.calls = 0
    nan = ["loss.distill=test_nan_after_2", "optim.max_nonfinite=5", "run.stop_at=4"]
    train(tiny_recipe(*nan, "run.name=none"))
    assert "no checkpoint of it (in a non-finite streak), so a resume starts afresh: there is no checkpoint yet" in (
        capsys.readouterr().out
    )
    NanAfterTwo.calls = 0
    train(tiny_recipe(*nan, "checkpoint.every=2"))
    out = capsys.readouterr().out
    root = tiny_recipe().run_dir / "checkpoints"
    assert (
        f"stopped at step 4 (run.stop_at), no checkpoint of it (in a non-finite streak), so a resume starts from {root / 'step_00000002'}"
        in out
    )


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
    assert nonfinite_cause({}, [images], None) == ""
    images[1, 0, 2, 2] = float("inf")
    assert nonfinite_cause({}, [images], None) == "; the batch's images hold a non-finite value (check the data)"
    said = nonfinite_cause({}, [images, torch.rand(2, 3, 8, 8)], None)  # (of a step's micro-batches, which)
    assert said == "; the images of micro-batch 1 of 2 hold a non-finite value (check the data)"


def test_a_teacher_giving_nan_for_an_earlier_micro_batch_is_named(tiny_recipe, monkeypatch):
    """grad_accum 2, the tiny vit_b giving NaN for step 2's first micro-batch only: only the step's last
    micro-batch was looked at again, and the stop blamed the learning rate."""
    forward, calls = TimmTeacher.forward, []

    def nan_once_for_vit_b(self, x):
        out = forward(self, x)
        if self.meta.embed_dim != 40:  # (vit_a's 48 channels stay finite)
            return out
        calls.append(x.clone())  # vit_b's third call: step 2's first micro-batch, the same images at the skip
        if len(calls) == 3 or len(calls) > 4 and torch.equal(x, calls[2]):
            return type(out)(tuple(t * float("nan") for t in out.levels), out.summary)
        return out

    monkeypatch.setattr(TimmTeacher, "forward", nan_once_for_vit_b)
    with pytest.raises(NonFiniteLossError, match="at step 2") as info:
        train(tiny_recipe("optim.grad_accum=2", "optim.max_nonfinite=1", "schedule.max_steps=4"))
    assert str(info.value).endswith(
        "; teacher 'vit_b' level 0 gives a non-finite value for the images of micro-batch 1 of 2 (check the "
        "teacher, its weights and precision.teachers)."
    )


def test_a_teacher_giving_nan_on_another_process_is_named_with_it(tmp_path):
    """Two processes: only process 1's batches meet the NaN teacher; the main process, which logs and raises
    first, named no cause of its own (its teacher and images are finite) and pointed at the learning rate."""
    import os

    from .test_distributed import TINY, accelerate_launch

    (tmp_path / "nan_on_process_1.py").write_text(
        "import torch.distributed as dist\n"
        "from sak.registry import TEACHERS\n"
        "from sak.teachers.timm_teacher import TimmTeacher\n\n\n"
        "@TEACHERS.register('nan_on_process_1')\n"
        "class NanOnProcess1(TimmTeacher):\n"
        "    def forward(self, x):\n"
        "        out = super().forward(x)\n"
        "        if dist.is_initialized() and dist.get_rank() == 1:\n"
        "            return type(out)(tuple(t * float('nan') for t in out.levels), out.summary)\n"
        "        return out\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run = accelerate_launch(str(TINY), f"run.output_dir={tmp_path}", "imports=[nan_on_process_1]",
                            "teachers.1.name=nan_on_process_1", "data.batch_size=2", "optim.max_nonfinite=2",
                            env=env)  # fmt: skip
    assert run.returncode != 0
    said = run.stdout + run.stderr
    assert "step 1: non-finite loss nan or gradient norm" in said, said[-3000:]
    assert ("teacher 'vit_b' level 0 gives a non-finite value for the batch's images (check the teacher, its "
            "weights and precision.teachers) (on process 1)") in said, said[-3000:]  # fmt: skip
