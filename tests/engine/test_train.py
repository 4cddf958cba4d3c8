"""The training loop on tiny models: it learns, resumes exactly, guards against NaN, runs bf16, and clips
under fp16 loss scaling (Accelerate's GradScaler path, emulated on the CPU)."""

import json
import math

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs
from safetensors.torch import load_file

import sak.engine.trainer as trainer_module
from sak.config import RecipeError
from sak.data.synthetic import SyntheticDataset
from sak.engine import NonFiniteLossError, train
from sak.engine.checkpoint import latest_checkpoint
from sak.registry import DATASETS, LOSSES


def logged(run_dir, key="loss"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def weights(run_dir):
    return load_file(str(latest_checkpoint(run_dir / "checkpoints") / "model.safetensors"))


def test_loss_is_finite_and_decreases_over_30_steps(tiny_recipe):
    recipe = tiny_recipe("schedule.max_steps=30", "schedule.warmup_steps=3", "optim.lr=3e-3")
    final = train(recipe)
    losses = logged(recipe.run_dir)
    assert sorted(losses) == list(range(1, 31))
    values = list(losses.values())
    assert all(torch.isfinite(torch.tensor(values)))
    assert sum(values[-5:]) / 5 < 0.7 * sum(values[:5]) / 5
    assert final["val/cosine/vit_a"] > 0.5 and final["val/cosine/vit_b"] > 0.5
    info = json.loads((recipe.run_dir / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["versions"]["torch"] and info["seed"] == 0
    assert (recipe.run_dir / "recipe.yaml").read_text() == recipe.to_yaml()


def test_resume_is_exact(tiny_recipe, tmp_path):
    """8 steps straight == 4 steps, stop, resume, 4 more: same weights and same logged losses."""
    common = ["schedule.max_steps=8", "data.num_workers=0", "student.model_kwargs.drop_path_rate=0.1"]
    straight = tiny_recipe(*common, "run.name=straight")
    train(straight)
    split = tiny_recipe(*common, "run.name=split", "run.stop_at=4")
    assert train(split) == {}
    assert latest_checkpoint(split.run_dir / "checkpoints").name == "step_00000004"
    resumed = tiny_recipe(*common, "run.name=split")
    train(resumed)
    a, b = weights(straight.run_dir), weights(split.run_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    assert logged(straight.run_dir) == logged(split.run_dir)


def test_resuming_at_run_stop_at_trains_nothing_and_says_how_to_go_on(tiny_recipe, capsys):
    """The same command again after a stop used to train one more step (and save it) each time."""
    recipe = tiny_recipe("run.stop_at=2")
    assert train(recipe) == {}
    assert "stopped at step 2 (run.stop_at), checkpoint saved; to go on, resume with a higher run.stop_at" in (
        capsys.readouterr().out
    )
    assert train(recipe) == {}
    assert "at step 2 already, run.stop_at=2: nothing to train" in capsys.readouterr().out
    assert [p.name for p in (recipe.run_dir / "checkpoints").iterdir()] == ["step_00000002"]
    assert sorted(logged(recipe.run_dir)) == [1, 2]
    train(tiny_recipe("run.stop_at=3"))
    assert latest_checkpoint(recipe.run_dir / "checkpoints").name == "step_00000003"


def test_keep_last_prunes_old_checkpoints(tiny_recipe):
    recipe = tiny_recipe("schedule.max_steps=6", "checkpoint.every=1", "checkpoint.keep_last=2")
    train(recipe)
    names = sorted(p.name for p in (recipe.run_dir / "checkpoints").iterdir())
    assert names == ["step_00000005", "step_00000006"]


@LOSSES.register("test_nan_after_2")
class NanAfterTwo(torch.nn.Module):
    calls = 0

    def forward(self, student, teacher):
        NanAfterTwo.calls += 1
        loss = sum(s.float().mean() * 0 + 1 for s in student)
        return loss * float("nan") if NanAfterTwo.calls > 4 else loss  # two teachers per step


def test_nonfinite_guard_skips_steps_then_stops_keeping_last_checkpoint(tiny_recipe):
    NanAfterTwo.calls = 0
    recipe = tiny_recipe("loss.distill=test_nan_after_2", "checkpoint.every=2", "optim.max_nonfinite=3")
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses or gradient norms at step 5") as info:
        train(recipe)
    assert "step_00000002" in str(info.value)
    assert latest_checkpoint(recipe.run_dir / "checkpoints").name == "step_00000002"
    streaks = logged(recipe.run_dir, "nonfinite_streak")
    assert streaks[3] == 1 and streaks[5] == 3


@LOSSES.register("test_nan_grad_at_3")
class NanGradientAtStepThree(torch.nn.Module):
    """A finite loss whose gradient is NaN at step 3 (as an overflow in backward): sqrt's gradient at 0."""

    calls = 0

    def forward(self, student, teacher):
        NanGradientAtStepThree.calls += 1
        loss = sum(s.float().mean() for s in student)
        if NanGradientAtStepThree.calls in (5, 6):  # two teachers per step
            loss = loss + 0.0 * torch.sqrt((student[0] - student[0].detach()).abs().sum())
        return loss


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


def test_bf16_on_cpu_trains(tiny_recipe):
    recipe = tiny_recipe("precision.mixed=bf16", "schedule.max_steps=3")
    final = train(recipe)
    assert all(torch.isfinite(torch.tensor(v)) for v in logged(recipe.run_dir).values())
    assert final["val/loss"] > 0


def test_fp16_without_gpu_is_an_error_not_a_silent_fp32_run(tiny_recipe):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: fp16 is real there")
    with pytest.raises(RecipeError, match="fp16 needs a CUDA GPU"):
        train(tiny_recipe("precision.mixed=fp16"))


class ScaledOnCpu(Accelerator):
    """Accelerate's fp16 loss-scaling path (a GradScaler, unscale before clipping, steps skipped on overflow)
    on the CPU, where Accelerate only offers it on GPUs: float32 compute (autocast off), the scaler's
    power-of-two scale changes no bit of the unscaled gradients."""

    mixed_precision = property(lambda self: "fp16")  # what unscale_gradients checks

    last = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, kwargs_handlers=[AutocastKwargs(enabled=False)], **kwargs)
        self.native_amp = True
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        ScaledOnCpu.last = self


def test_fp16_loss_scaling_clips_the_unscaled_gradients(tiny_recipe, monkeypatch):
    """With a GradScaler the gradients are clipped after unscaling, once per optimiser step: the same losses,
    gradient norms and weights as without one."""
    common = ["schedule.max_steps=4", "optim.grad_clip=0.05"]
    plain = tiny_recipe("run.name=plain", *common)
    train(plain)
    monkeypatch.setattr(trainer_module, "Accelerator", ScaledOnCpu)
    scaled = tiny_recipe("run.name=scaled", *common)
    train(scaled)
    assert ScaledOnCpu.last.scaler.state_dict()["_growth_tracker"] == 4  # 4 scaled steps, none skipped
    norms = logged(plain.run_dir, "grad_norm")
    assert min(norms.values()) > 0.05  # every step clipped
    assert logged(scaled.run_dir, "grad_norm") == pytest.approx(norms, rel=1e-5)
    assert logged(scaled.run_dir) == pytest.approx(logged(plain.run_dir), rel=1e-5)
    a, b = weights(plain.run_dir), weights(scaled.run_dir)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)


def test_fp16_loss_scaling_survives_skipped_steps(tiny_recipe, monkeypatch):
    """A non-finite loss skips the step before anything is unscaled: unscaling at it would leave the scaler
    "already unscaled" and the next step would fail inside GradScaler instead of being guarded."""
    NanAfterTwo.calls = 0
    monkeypatch.setattr(trainer_module, "Accelerator", ScaledOnCpu)
    recipe = tiny_recipe("loss.distill=test_nan_after_2", "optim.grad_clip=1.0", "optim.max_nonfinite=3")
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses or gradient norms at step 5"):
        train(recipe)
    assert sorted(logged(recipe.run_dir, "grad_norm")) == [1, 2]


def test_grad_accumulation_matches_a_larger_batch(tiny_recipe):
    """2 x batch 2 with accumulation == 1 x batch 4 (same samples, same mean gradient)."""
    big = tiny_recipe("run.name=big", "schedule.max_steps=3")
    train(big)
    acc = tiny_recipe("run.name=acc", "schedule.max_steps=3", "data.batch_size=2", "optim.grad_accum=2")
    train(acc)
    la, lb = logged(big.run_dir), logged(acc.run_dir)
    assert la.keys() == lb.keys()
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-5)
    a, b = weights(big.run_dir), weights(acc.run_dir)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


def test_an_epochs_short_last_step_takes_the_mean_gradient_of_its_micro_batches(tiny_recipe, monkeypatch):
    """3 batches an epoch with grad_accum 2: the second step has one micro-batch, and its gradient (the logged
    grad_norm, clipping out of reach) is that micro-batch's, not half of it (Accelerate divides every
    micro-batch's loss by grad_accum); the full step's is the mean of its two."""
    totals, grads = [], []
    compute, backward = trainer_module.compute_losses, Accelerator.backward

    def capture(*args, **kwargs):
        losses = compute(*args, **kwargs)
        totals.append(losses.total)
        return losses

    def record(self, loss, **kwargs):
        params = [p for p in self._models[0].parameters() if p.requires_grad]
        found = torch.autograd.grad(totals[-1], params, retain_graph=True, allow_unused=True)
        grads.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(found, params, strict=True)]
            )
        )
        return backward(self, loss, **kwargs)

    monkeypatch.setattr(trainer_module, "compute_losses", capture)
    monkeypatch.setattr(Accelerator, "backward", record)
    recipe = tiny_recipe(
        "data.options.length=12", "data.batch_size=4", "optim.grad_accum=2", "schedule.max_steps=null",
        "schedule.epochs=1", "optim.grad_clip=1e9",
    )  # fmt: skip
    train(recipe)
    norms = logged(recipe.run_dir, "grad_norm")
    assert len(grads) == 3 and sorted(norms) == [1, 2]
    assert norms[1] == pytest.approx(torch.stack(grads[:2]).mean(0).norm().item(), rel=1e-4)
    assert norms[2] == pytest.approx(grads[2].norm().item(), rel=1e-4)


def test_trackers_wandb_offline_and_tensorboard_write_into_the_run_directory(tiny_recipe, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    recipe = tiny_recipe("schedule.max_steps=2", "logging.wandb.mode=offline", "logging.tensorboard=true")
    train(recipe)
    assert list(recipe.run_dir.rglob("events.out.tfevents.*")), "no tensorboard event file"
    assert list((recipe.run_dir / "wandb").glob("offline-run-*")), "no offline wandb run"


def test_tensorboard_drops_what_a_resume_retrains_and_a_fresh_start_sets_the_old_run_aside(tiny_recipe):
    """As metrics.jsonl: TensorBoard kept the abandoned steps after the checkpoint resumed from, and a
    resume=never run drew its curve in the old run's series."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    def losses(folder):
        events = EventMultiplexer().AddRunsFromDirectory(str(folder))
        events.Reload()
        runs = [run for run, tags in events.Runs().items() if "loss" in tags["scalars"]]  # (hparams: a run apart)
        return sorted((e.step, round(e.value, 4)) for run in runs for e in events.Scalars(run, "loss"))

    common = ["data.options.length=8", "data.batch_size=2", "schedule.max_steps=3", "logging.tensorboard=true",
              "checkpoint.every=1", "checkpoint.keep_last=0"]  # fmt: skip
    recipe = tiny_recipe(*common)
    train(recipe)
    first = losses(recipe.run_dir / "sak")
    train(
        tiny_recipe(*common, f"checkpoint.resume={recipe.run_dir / 'checkpoints' / 'step_00000001'}", "optim.lr=0.05")
    )
    resumed = losses(recipe.run_dir / "sak")
    assert [s for s, _ in first] == [1, 2, 3] and [s for s, _ in resumed] == [1, 2, 3]
    assert resumed[0] == first[0] and resumed[1:] != first[1:]  # steps 2-3 once, the retrained ones
    train(tiny_recipe(*common, "checkpoint.resume=never"))
    assert [s for s, _ in losses(recipe.run_dir / "sak")] == [1, 2, 3]
    assert list((recipe.run_dir / "checkpoints").glob("previous-*/sak/events.out.tfevents.*"))


def test_epoch_based_length_counts_optimizer_steps(tiny_recipe):
    """32 samples, batch 4 -> 8 steps per epoch; 2 epochs = 16 steps; the data order changes per epoch."""
    recipe = tiny_recipe("schedule.max_steps=null", "schedule.epochs=2", "logging.sample_ids=true")
    train(recipe)
    assert max(logged(recipe.run_dir)) == 16
    rows = [json.loads(x) for x in (recipe.run_dir / "samples" / "rank0.jsonl").read_text().splitlines()]
    first, second = [sum((r["ids"] for r in rows[e * 8 : (e + 1) * 8]), []) for e in (0, 1)]
    assert sorted(first) == sorted(second) and len(set(first)) == 32 and first != second


@DATASETS.register("test_epoch_probe")
class EpochProbe(SyntheticDataset):
    """The synthetic dataset, recording the epoch its augmentation sees for each sample it serves."""

    seen: list = []

    def __getitem__(self, index):
        EpochProbe.seen.append(self.epoch)
        return super().__getitem__(index)


def test_each_epoch_draws_new_augmentation(tiny_recipe):
    EpochProbe.seen = []
    recipe = tiny_recipe("data.name=test_epoch_probe", "schedule.max_steps=null", "schedule.epochs=2")
    train(recipe)
    train_seen = EpochProbe.seen[: 2 * 32]  # evaluation batches come after
    assert train_seen[:32] == [0] * 32 and train_seen[32:] == [1] * 32


def test_batches_cross_to_the_gpu_with_asynchronous_copies_from_page_locked_memory(tiny_recipe):
    """The training loader pins its batches on a CUDA machine and Accelerate's copies to the device do not
    block the host (a cached batch is 505 MB at the ViT-B stage-1 scale); on the CPU nothing is pinned."""
    from sak.engine import make_accelerator
    from sak.engine.build import build_loader

    recipe = tiny_recipe()
    assert make_accelerator(recipe).non_blocking is True
    assert build_loader(recipe, recipe.data.split, train=True).pin_memory is torch.cuda.is_available()


def test_epochs_with_accumulation_count_the_short_last_step_and_log_its_mean_loss(tiny_recipe):
    """8 batches an epoch with grad_accum 3: Accelerate steps after batches 3, 6 and 8 (the end of the loader),
    so 2 epochs are 6 optimiser steps over all 64 samples, and each step logs the mean of its micro-batches'
    losses (2 of them in the short step), not their sum divided by 3."""
    recipe = tiny_recipe(
        "schedule.max_steps=null", "schedule.epochs=2", "optim.grad_accum=3", "logging.sample_ids=true"
    )
    train(recipe)
    rows = [json.loads(x) for x in (recipe.run_dir / "samples" / "rank0.jsonl").read_text().splitlines()]
    per_step = [sum(r["step"] == s for r in rows) for s in range(1, 7)]
    assert per_step == [3, 3, 2, 3, 3, 2] and sum(len(r["ids"]) for r in rows) == 64
    losses = logged(recipe.run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    mean = sum(losses.values()) / 6
    assert losses[3] > 0.8 * min(losses[2], losses[4]) and abs(losses[3] - mean) < 0.5 * mean


def test_saving_a_step_again_keeps_a_complete_copy_at_every_moment(tiny_recipe, monkeypatch):
    """run.stop_at on a periodic checkpoint's step saves once; a save of a step that exists replaces it by
    renames, and a kill between them is undone by the next start (clean_partials)."""
    import os

    from sak.engine import checkpoint

    recipe = tiny_recipe("checkpoint.every=2", "checkpoint.keep_last=1", "run.stop_at=2")
    saves = []
    real_save = checkpoint.save_checkpoint
    monkeypatch.setattr(
        "sak.engine.trainer.save_checkpoint", lambda *a, **k: saves.append(a[2].step) or real_save(*a, **k)
    )
    train(recipe)
    assert saves == [2]  # the stop did not save step 2 a second time
    root = recipe.run_dir / "checkpoints"
    kept = latest_checkpoint(root)
    # a second save of step 2, killed right after the old copy was set aside
    real_replace, calls = os.replace, []

    def killed(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    from accelerate import Accelerator

    state = checkpoint.TrainState(step=2)
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(1, 1))
    monkeypatch.setattr(checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(accelerator, root, state, {}, keep_last=1)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert latest_checkpoint(root) is None  # step 2 is set aside, its replacement never arrived...
    checkpoint.clean_partials(root)
    assert latest_checkpoint(root) == kept and (kept / "model.safetensors").is_file()  # ...and is put back
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]


def test_a_fresh_run_sets_another_runs_checkpoints_aside(tiny_recipe):
    """resume: never in a run directory with checkpoints: they are moved out of the new run's way (not
    deleted), so pruning keeps the new run's own and resume: auto continues the new run."""
    train(tiny_recipe("schedule.max_steps=6", "checkpoint.every=2", "checkpoint.keep_last=2"))
    recipe = tiny_recipe("schedule.max_steps=6", "checkpoint.every=2", "checkpoint.resume=never", "run.stop_at=2")
    train(recipe)
    root = recipe.run_dir / "checkpoints"
    assert latest_checkpoint(root).name == "step_00000002"
    (aside,) = [p for p in root.iterdir() if p.name.startswith("previous-")]
    assert sorted(p.name for p in aside.iterdir()) == [
        "final_metrics.json",
        "metrics.jsonl",
        "step_00000004",
        "step_00000006",
    ]


def test_a_torn_last_metrics_line_does_not_stop_a_resume(tiny_recipe):
    recipe = tiny_recipe("checkpoint.every=2", "run.stop_at=4")
    train(recipe)
    with open(recipe.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # killed mid-line
    train(tiny_recipe("checkpoint.every=2"))
    assert sorted(logged(recipe.run_dir)) == list(range(1, 9))


def test_a_partial_evaluation_does_not_move_the_accumulation_boundaries(tiny_recipe):
    """3 batches an epoch, grad_accum 2, an evaluation of 1 batch after every step: each step takes the same
    micro-batches as without evaluation (an evaluation stopped early used to leave its loader registered with
    Accelerate, which then missed the training epoch's end and made a step span two epochs)."""
    common = ["data.options.length=12", "optim.grad_accum=2", "schedule.max_steps=4", "logging.sample_ids=true",
              "eval.every=1", "schedule.warmup_steps=0"]  # fmt: skip
    steps = {}
    for batches in (0, 1):
        recipe = tiny_recipe(f"run.name=eval{batches}", f"eval.batches={batches}", *common)
        train(recipe)
        rows = [json.loads(x) for x in (recipe.run_dir / "samples" / "rank0.jsonl").read_text().splitlines()]
        steps[batches] = [r["step"] for r in rows]
    assert steps[1] == steps[0] == [1, 1, 2, 3, 3, 4], steps


def test_the_git_revision_is_this_checkouts_and_none_for_a_copy_inside_another_repository(tmp_path):
    """A copy of sak installed inside another project's repository must not report that project's revision."""
    import shutil
    import subprocess
    import sys

    from sak.engine.logging import git_revision
    from tests.conftest import REPO

    if (REPO / ".git").exists():  # a checkout (CI clones one): its own revision
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        assert git_revision().split("+")[0] == head
    other = tmp_path / "project"
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    git = ["git", "-C", str(other), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "other project"], check=True)
    shutil.copytree(REPO / "sak", other / "venv" / "sak")
    code = "from sak.engine.logging import git_revision; print(git_revision())"
    out = subprocess.run([sys.executable, "-c", code], cwd=other / "venv", capture_output=True, text=True)
    assert out.stdout.strip() == "None", out.stderr[-2000:]


def test_each_start_is_recorded_and_a_changed_recipe_on_resume_is_named(tiny_recipe, capsys):
    """recipe.yaml and run_info.json describe the latest start; starts.jsonl keeps every start's, so a number
    logged before a resume still traces to the recipe that made it, and the resume says what changed."""
    recipe = tiny_recipe("checkpoint.every=2", "run.stop_at=2")
    train(recipe)
    train(tiny_recipe("checkpoint.every=2", "optim.lr=5.0e-2"))
    starts = [json.loads(x) for x in (recipe.run_dir / "starts.jsonl").read_text().splitlines()]
    assert [s["recipe"]["optim"]["lr"] for s in starts] == [1e-3, 5e-2]
    assert all("git_revision" in s and "command" in s for s in starts)
    out = capsys.readouterr()
    assert (
        "the recipe (or the cache it reads) differs from the one" in out.out + out.err
        and "optim.lr: 0.001 -> 0.05" in out.out + out.err
    )
    assert (
        "run.stop_at" not in (out.out + out.err).split("the recipe (or the cache it reads) differs")[1].split("\n")[0]
    )


def test_resuming_into_another_student_is_one_error_naming_the_misfit_and_the_changes(tiny_recipe, capsys):
    """Not accelerate's load_state RuntimeError with a line per tensor: what does not fit, and which recipe
    values changed since the checkpoint."""
    train(tiny_recipe("checkpoint.every=2", "run.stop_at=2"))
    with pytest.raises(ValueError) as exc:
        train(tiny_recipe("checkpoint.every=2", "student.model_kwargs.embed_dim=48"))
    message = str(exc.value)
    assert message.startswith("cannot resume from ") and "step_00000002" in message
    assert "size mismatch for stem.vit.cls_token" in message and "student.model_kwargs.embed_dim: 32 -> 48" in message
    assert "Start a new run instead" in message and "\n" not in message


def test_a_refused_resume_leaves_the_runs_recipe_as_it_was(tiny_recipe):
    """recipe.yaml and run_info.json describe the start that trained: a resume refused (here, another student)
    does not overwrite them, so `sak export <run>/recipe.yaml` still builds the student of its weights."""
    recipe = tiny_recipe("checkpoint.every=2", "run.stop_at=2")
    train(recipe)
    files = {name: (recipe.run_dir / name).read_text() for name in ("recipe.yaml", "run_info.json", "starts.jsonl")}
    with pytest.raises(ValueError, match="cannot resume from"):
        train(tiny_recipe("checkpoint.every=2", "student.model_kwargs.embed_dim=48"))
    assert {name: (recipe.run_dir / name).read_text() for name in files} == files


def test_an_optimiser_state_of_other_trainable_parameters_is_a_misfit_not_a_damaged_file(tiny_recipe):
    """student.freeze=stem leaves other parameter groups: the optimiser's load_state_dict ValueError was reported
    as a damaged file, with advice to resume from an earlier checkpoint, which fails alike."""
    train(tiny_recipe("checkpoint.every=2", "run.stop_at=2"))
    with pytest.raises(ValueError) as exc:
        train(tiny_recipe("checkpoint.every=2", "student.freeze=stem"))
    message = str(exc.value)
    assert "its optimiser state does not fit this recipe's trainable parameters" in message
    assert "student.freeze: 'none' -> 'stem'" in message and "damaged" not in message


def test_a_resume_with_other_optimiser_settings_trains_with_them(tiny_recipe):
    """The optimiser's state_dict brings back the saved run's lr, weight decay, betas and eps, and the
    scheduler's its base learning rates: without putting the recipe's back, steps 3-8 ran at lr 1e-3 while
    recipe.yaml and starts.jsonl said 1e-5."""
    common = ["checkpoint.every=2", "schedule.name=constant", "schedule.warmup_steps=0"]
    recipe = tiny_recipe(*common, "run.stop_at=2")
    train(recipe)
    changed = [*common, "optim.lr=1.0e-5", "optim.weight_decay=0.5", "optim.betas=[0.8, 0.9]", "optim.eps=1.0e-6"]
    train(tiny_recipe(*changed))
    rows = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == [1e-3] * 2 + [1e-5] * 6
    saved = torch.load(recipe.run_dir / "checkpoints" / "step_00000008" / "optimizer.bin", weights_only=True)
    groups = [{k: g[k] for k in ("lr", "initial_lr", "weight_decay", "betas", "eps")} for g in saved["param_groups"]]
    assert groups == [
        {"lr": 1e-5, "initial_lr": 1e-5, "weight_decay": wd, "betas": (0.8, 0.9), "eps": 1e-6} for wd in (0.5, 0.0)
    ]


def test_a_key_added_to_the_schema_since_the_checkpoint_is_not_a_change(tiny_recipe, tmp_path):
    """An older run's recipe.yaml lacks keys added since (e.g. student.grad_checkpointing): at their defaults
    they are not reported as changed; set to something else, they are."""
    from sak.engine.trainer import recipe_changes

    recipe = tiny_recipe("schedule.max_steps=1")
    train(recipe)
    saved = yaml.safe_load((recipe.run_dir / "recipe.yaml").read_text())
    del saved["student"]["grad_checkpointing"]
    del saved["teachers"][1]["normalization"]  # inside a list of sections too
    saved["teachers"][0] = dict(reversed(saved["teachers"][0].items()))  # (a hand-edited order is no change)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert recipe_changes(tmp_path / "recipe.yaml", recipe) == []
    changed = tiny_recipe(
        "schedule.max_steps=1",
        "student.grad_checkpointing=true",
        "teachers.1.normalization=imagenet",
        "teachers.0.image_size=70",
    )
    assert recipe_changes(tmp_path / "recipe.yaml", changed) == [
        "student.grad_checkpointing: None -> True",
        "teachers.0.image_size: None -> 70",
        "teachers.1.normalization: None -> 'imagenet'",
    ]


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.bin", "trainer_state.json", "random_states_0.pkl"])
def test_a_damaged_checkpoint_is_named_with_the_one_before_to_resume_from(victim, tiny_recipe):
    """A file of the latest checkpoint cut short (a disk fault, a copy that stopped): one error naming the
    checkpoint, what could not be read and the earlier checkpoint, which then resumes."""
    from sak.engine.checkpoint import CheckpointError

    common = ["checkpoint.every=1", "checkpoint.keep_last=2", "schedule.max_steps=3"]
    train(tiny_recipe(*common, "run.stop_at=2"))
    ckpts = tiny_recipe(*common).run_dir / "checkpoints"
    file = ckpts / "step_00000002" / victim
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    with pytest.raises(CheckpointError) as exc:
        train(tiny_recipe(*common))
    message = str(exc.value)
    assert message.startswith(f"cannot resume from {ckpts / 'step_00000002'}: a file of it is damaged or unreadable (")
    assert f"checkpoint.resume={ckpts / 'step_00000001'}" in message and "\n" not in message
    train(tiny_recipe(*common, f"checkpoint.resume={ckpts / 'step_00000001'}"))
    assert 3 in logged(tiny_recipe(*common).run_dir) and (ckpts / "step_00000003").is_dir()


def test_resuming_with_loss_normalize_turned_on_since_is_named(tiny_recipe):
    from sak.engine.checkpoint import CheckpointError

    common = ["checkpoint.every=1", "schedule.max_steps=3"]
    train(tiny_recipe(*common, "run.stop_at=1"))
    with pytest.raises(CheckpointError, match="holds no target statistics, as its run had loss.normalize none"):
        train(tiny_recipe(*common, "loss.normalize=standardize"))


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(tiny_recipe, capsys):
    """Pruning keeps the highest steps: after a resume from step 2 of a run that reached step 6, it used to
    delete the new step-4 checkpoint and keep the abandoned step 6, which `resume: auto` then continued."""
    common = ["schedule.max_steps=10", "checkpoint.every=2"]
    train(tiny_recipe(*common, "run.stop_at=6", "checkpoint.keep_last=3"))
    root = tiny_recipe().run_dir / "checkpoints"
    train(
        tiny_recipe(*common, "run.stop_at=4", "checkpoint.keep_last=1", f"checkpoint.resume={root / 'step_00000002'}")
    )
    assert latest_checkpoint(root).name == "step_00000004"
    (aside,) = [p for p in root.iterdir() if p.name.startswith("abandoned-")]
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000004", "step_00000006"]  # the abandoned line
    assert f"the checkpoints after step 2 in {root} moved to {aside}" in capsys.readouterr().out
    train(tiny_recipe(*common, "checkpoint.keep_last=1"))
    assert sorted(logged(tiny_recipe().run_dir)) == list(range(1, 11))  # one line of training, each step once


def test_a_checkpoint_of_another_number_of_processes_is_refused(tiny_recipe):
    """Each process's place in the epoch and its random states would differ: the resume would repeat data."""
    from sak.engine.checkpoint import CheckpointError

    train(tiny_recipe("run.stop_at=2"))
    ckpt = latest_checkpoint(tiny_recipe().run_dir / "checkpoints")
    (ckpt / "random_states_1.pkl").write_bytes((ckpt / "random_states_0.pkl").read_bytes())  # as 2 processes write
    with pytest.raises(CheckpointError, match="written by 2 process.* this run has 1; an exact resume needs the same"):
        train(tiny_recipe())


def test_a_finished_run_started_again_returns_its_final_metrics_and_logs_nothing_new(tiny_recipe, capsys):
    """The metrics come from the final checkpoint (saved with it, in one whole), not from the run directory's
    final_metrics.json, which a fresh start or a kill could leave from another run; a longer schedule trains on."""
    recipe = tiny_recipe("schedule.max_steps=2")
    final = train(recipe)
    lines = (recipe.run_dir / "metrics.jsonl").read_text()
    (recipe.run_dir / "final_metrics.json").write_text('{"val/loss": 1')  # torn, or another run's
    assert train(tiny_recipe("schedule.max_steps=2")) == final
    assert "finished already, at step 2 (final metrics in" in capsys.readouterr().out
    assert (recipe.run_dir / "metrics.jsonl").read_text() == lines
    assert json.loads((recipe.run_dir / "final_metrics.json").read_text()) == final  # the checkpoint's, again
    # started again with a shorter schedule: says so, and recipe.yaml stays the recipe that trained it
    (recipe.run_dir / "final_metrics.json").unlink()  # (a kill between the final checkpoint and this file)
    assert train(tiny_recipe("schedule.max_steps=1")) == final
    assert "finished already, at step 2 (this recipe asks for 1)" in capsys.readouterr().out
    assert yaml.safe_load((recipe.run_dir / "recipe.yaml").read_text())["schedule"]["max_steps"] == 2
    assert json.loads((recipe.run_dir / "final_metrics.json").read_text()) == final
    longer = train(tiny_recipe("schedule.max_steps=3"))
    assert sorted(logged(recipe.run_dir)) == [1, 2, 3] and longer != final
    assert json.loads((recipe.run_dir / "final_metrics.json").read_text()) == longer


def test_sample_records_of_steps_lost_to_a_crash_are_dropped_on_resume(tiny_recipe):
    """A run that trained past its last checkpoint and died: the resume trains those steps again, and each
    step's ids are recorded once, as its metrics are. A fresh start sets the old records aside with the
    checkpoints."""
    common = ["schedule.max_steps=4", "checkpoint.every=2", "logging.sample_ids=true"]
    recipe = tiny_recipe(*common, "run.stop_at=3")
    train(recipe)
    root = recipe.run_dir / "checkpoints"
    import shutil

    shutil.rmtree(root / "step_00000003")  # as if killed after step 3, before any checkpoint of it
    records = recipe.run_dir / "samples" / "rank0.jsonl"
    with open(records, "a") as f:
        f.write('{"step": 4, "ids": ["0000')  # and killed while writing a record
    train(tiny_recipe(*common))
    steps = [json.loads(line)["step"] for line in records.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    train(tiny_recipe(*common, "checkpoint.resume=never", "run.stop_at=1"))
    assert [json.loads(line)["step"] for line in records.read_text().splitlines()] == [1]
    (aside,) = [p for p in root.iterdir() if p.name.startswith("previous-")]
    assert (aside / "samples" / "rank0.jsonl").read_text().count("\n") == 4 and (aside / "metrics.jsonl").is_file()


def test_a_stage_2_run_resumes_without_its_init_from_source(tiny_recipe, tmp_path):
    """The checkpoint holds the weights once the run has started: the stage-1 run may be gone by then."""
    import shutil

    from ..conftest import TESTS

    TINY_MULTITASK = TESTS / "tiny_multitask.yaml"

    stage1 = tiny_recipe("run.name=stage1", "schedule.max_steps=1")
    train(stage1)
    common = ["run.name=stage2", "schedule.max_steps=3", f"checkpoint.init_from={stage1.run_dir}"]
    train(tiny_recipe(*common, "run.stop_at=2", path=TINY_MULTITASK))
    shutil.rmtree(stage1.run_dir)
    train(tiny_recipe(*common, path=TINY_MULTITASK))
    assert sorted(logged(tmp_path / "stage2")) == [1, 2, 3]


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


def test_a_damaged_recipe_copy_in_a_checkpoint_is_named(tiny_recipe):
    from sak.engine.checkpoint import CheckpointError

    train(tiny_recipe("run.stop_at=2"))
    ckpt = latest_checkpoint(tiny_recipe().run_dir / "checkpoints")
    for text in ("teachers: [oops", "- a\n- list\n"):
        (ckpt / "recipe.yaml").write_text(text)
        with pytest.raises(CheckpointError, match=f"cannot resume from {ckpt}: a file of it is damaged"):
            train(tiny_recipe())
