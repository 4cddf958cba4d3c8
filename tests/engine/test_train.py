"""The training loop on tiny models: it learns, prunes checkpoints, runs bf16, and clips under fp16 loss scaling
(Accelerate's GradScaler path, emulated on the CPU); the non-finite guard is in test_nonfinite.py."""

import json
import re
import time
import types

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs
from safetensors.torch import load_file

import sak.engine.launch as launch_module
import sak.engine.trainer as trainer_module
from sak.config import RecipeError
from sak.data.synthetic import SyntheticDataset
from sak.engine import NonFiniteLossError, train
from sak.engine.checkpoint import latest_checkpoint
from sak.registry import DATASETS

from .nan_losses import NanAfterTwo, NanGradientAtStepThree, NanGradientFromStepThree


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
    assert -1 <= final["val/spatial_cosine/vit_a"] <= 1 and -1 <= final["val/spatial_cosine/vit_b"] <= 1
    info = json.loads((recipe.run_dir / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["versions"]["torch"] and info["seed"] == 0
    assert (recipe.run_dir / "recipe.yaml").read_text() == recipe.to_yaml()


def test_keep_last_prunes_old_checkpoints(tiny_recipe):
    recipe = tiny_recipe("schedule.max_steps=6", "checkpoint.every=1", "checkpoint.keep_last=2")
    train(recipe)
    names = sorted(p.name for p in (recipe.run_dir / "checkpoints").iterdir())
    assert names == ["step_00000005", "step_00000006"]


def test_bf16_on_cpu_trains(tiny_recipe):
    recipe = tiny_recipe("precision.mixed=bf16", "schedule.max_steps=3")
    final = train(recipe)
    assert all(torch.isfinite(torch.tensor(v)) for v in logged(recipe.run_dir).values())
    assert final["val/loss"] > 0


def test_fp16_without_gpu_is_an_error_not_a_silent_fp32_run(tiny_recipe, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # (on a GPU machine too: it skipped there)
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
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    at_step = []  # the gradients' norm as the optimiser steps (the logged norm is the one before clipping)
    hook = register_optimizer_step_pre_hook(lambda opt, *_: at_step.append(
        torch.nn.utils.get_total_norm([p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None])))  # fmt: skip
    try:
        plain = tiny_recipe("run.name=plain", *common)
        train(plain)
        monkeypatch.setattr(launch_module, "Accelerator", ScaledOnCpu)
        scaled = tiny_recipe("run.name=scaled", *common)
        train(scaled)
    finally:
        hook.remove()
    assert len(at_step) == 8 and max(at_step) <= 0.05 * (1 + 1e-5)  # clipped at every step of both runs
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
    monkeypatch.setattr(launch_module, "Accelerator", ScaledOnCpu)
    recipe = tiny_recipe("loss.distill=test_nan_after_2", "optim.grad_clip=1.0", "optim.max_nonfinite=3")
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses or gradient norms at step 5") as info:
        train(recipe)
    assert sorted(logged(recipe.run_dir, "grad_norm")) == [1, 2]
    assert "There is no checkpoint yet (lower optim.lr" in str(info.value)  # (it said "checkpoint is None")


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
    runs = list((recipe.run_dir / "wandb").glob("offline-run-*"))
    assert runs, "no offline wandb run"
    train(recipe)  # finished already: trains and logs nothing, so it opens no (empty) wandb run either
    assert list((recipe.run_dir / "wandb").glob("offline-run-*")) == runs
    longer = ["schedule.max_steps=4", "run.stop_at=3", "logging.wandb.mode=offline", "logging.tensorboard=true"]
    train(tiny_recipe(*longer))  # trains step 3: an offline folder of its own, for the same wandb run
    assert len(list((recipe.run_dir / "wandb").glob("offline-run-*"))) == len(runs) + 1
    runs = list((recipe.run_dir / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<run id>, with -N after it for two starts of one run in one second: `wandb sync` joins them
    ids = {re.fullmatch(r"offline-run-\d{8}_\d{6}-(\w+?)(-\d+)?", run.name)[1] for run in runs}
    assert ids == {(recipe.run_dir / "wandb" / "sak_run_id").read_text().strip()}, ids
    train(tiny_recipe(*longer))  # at run.stop_at already: trains nothing
    assert list((recipe.run_dir / "wandb").glob("offline-run-*")) == runs
    train(tiny_recipe(*longer, "checkpoint.resume=never"))  # a fresh start: another wandb run
    fresh = list((recipe.run_dir / "wandb").glob("offline-run-*"))
    assert len(fresh) == 1 and re.fullmatch(r"offline-run-\d{8}_\d{6}-(\w+?)(-\d+)?", fresh[0].name)[1] not in ids


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
    # (TensorBoard reads a run's event files in name order: events.out.tfevents.<second>.<host>.<pid>.<writer
    # number>; in one second of one process, the 10th writer's file sorts before the 8th's, and the purge is undone)
    time.sleep(1 - time.time() % 1)
    train(
        tiny_recipe(*common, f"checkpoint.resume={recipe.run_dir / 'checkpoints' / 'step_00000001'}", "optim.lr=0.05")
    )
    resumed = losses(recipe.run_dir / "sak")
    assert [s for s, _ in first] == [1, 2, 3] and [s for s, _ in resumed] == [1, 2, 3]
    assert resumed[0] == first[0] and resumed[1:] != first[1:]  # steps 2-3 once, the retrained ones
    train(tiny_recipe(*common, "checkpoint.resume=never"))
    assert [s for s, _ in losses(recipe.run_dir / "sak")] == [1, 2, 3]
    assert list((recipe.run_dir / "checkpoints").glob("previous-*/sak/events.out.tfevents.*"))


def test_evaluating_the_final_checkpoint_again_leaves_tensorboard_one_evaluation_and_the_training_row(tiny_recipe):
    """A final evaluation whose metrics never reached the checkpoint (a kill), evaluated again with other eval
    settings: metrics.jsonl dropped the old val row, TensorBoard kept it beside the new one at the same step."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    def scalars(folder, tag):
        events = EventMultiplexer().AddRunsFromDirectory(str(folder))
        events.Reload()
        runs = [run for run, tags in events.Runs().items() if tag in tags["scalars"]]
        return sorted((e.step, round(e.value, 5)) for run in runs for e in events.Scalars(run, tag))

    common = ["schedule.max_steps=2", "logging.tensorboard=true", "eval.batches=1"]
    recipe = tiny_recipe(*common)
    train(recipe)
    for file in (
        recipe.run_dir / "final_metrics.json",
        recipe.run_dir / "checkpoints" / "step_00000002" / "final_metrics.json",
    ):
        file.unlink()  # (as if killed before the final metrics were written)
    loss = scalars(recipe.run_dir / "sak", "loss")
    time.sleep(1 - time.time() % 1)  # (event files of one second sort by writer number as text: see above)
    final = train(tiny_recipe(*common, "eval.batches=2"))
    assert scalars(recipe.run_dir / "sak", "val/loss") == [(2, round(final["val/loss"], 5))]
    assert scalars(recipe.run_dir / "sak", "loss") == loss  # (the final step's training row, logged again)


def test_the_progress_bar_draws_each_steps_own_values(tiny_recipe):
    """The bar was updated before its postfix was set: it drew step N's count beside step N-1's loss."""
    import io

    from tqdm.auto import tqdm

    from sak.engine.logging import RunLogger

    logger = RunLogger.__new__(RunLogger)
    out = io.StringIO()
    logger.bar = tqdm(total=3, file=out, mininterval=0, miniters=1)
    for step, loss in ((1, 7.25), (2, 5.5)):
        logger.progress(1, {"loss": loss})
        drawn = out.getvalue().rsplit("\r", 1)[-1]  # (the bar as last drawn)
        assert f"{step}/3" in drawn and f"loss={loss:.4g}" in drawn, drawn


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


@DATASETS.register("test_wide_canvas")
class WideCanvas(SyntheticDataset):
    """A plug-in whose evaluation canvas (its prediction_canvas, as the docs ask) is wider than its samples."""

    @classmethod
    def prediction_canvas(cls, image_size, options):
        return (image_size, 2 * image_size), (124, 116, 104)


def test_a_plug_ins_evaluation_canvas_a_fixed_size_student_cannot_take_is_refused_before_any_step(tiny_recipe):
    """Only a dataset attribute `eval_size` was looked at: a plug-in padding its evaluation samples to its canvas
    trained up to its first evaluation and failed there in timm's words (Input width (128) doesn't match ...)."""
    recipe = tiny_recipe("data.name=test_wide_canvas")
    with pytest.raises(RecipeError, match=r"takes 64x64 inputs but the evaluation canvas is 64x128: set data.options "
                                          r"\(the evaluation canvas of WideCanvas\)"):  # fmt: skip
        train(recipe)
    assert not (recipe.run_dir / "metrics.jsonl").exists()


def test_batches_cross_to_the_gpu_with_asynchronous_copies_from_page_locked_memory(tiny_recipe):
    """The training loader pins its batches on a CUDA machine and Accelerate's copies to the device do not
    block the host (a cached batch is 505 MB at the ViT-B stage-1 scale); on the CPU nothing is pinned."""
    from sak.engine import make_accelerator
    from sak.engine.build import build_loader

    recipe = tiny_recipe()
    assert make_accelerator(recipe).non_blocking is True
    assert build_loader(recipe, recipe.data.split, train=True).pin_memory is torch.cuda.is_available()


def test_a_launch_that_sets_another_grad_accum_than_the_recipe_is_refused(tiny_recipe, monkeypatch):
    """`accelerate launch --gradient_accumulation_steps 2` sets an environment variable Accelerate takes over
    the value sak passes: each step trained on twice the images while sak counted the recipe's."""
    from sak.config import RecipeError
    from sak.engine import make_accelerator

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    with pytest.raises(RecipeError, match=r"optim.grad_accum is 1 but Accelerate was configured with 2 .* "
                       r"set it in the recipe \(optim.grad_accum=2\)"):  # fmt: skip
        make_accelerator(tiny_recipe())
    assert make_accelerator(tiny_recipe("optim.grad_accum=2")).gradient_accumulation_steps == 2
    monkeypatch.delenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    prepare = Accelerator.prepare

    def deepspeed_prepare(self, *args, **kwargs):  # a DeepSpeed config's value is applied here, with a warning
        prepared = prepare(self, *args, **kwargs)
        self.gradient_accumulation_steps = 4
        return prepared

    monkeypatch.setattr(Accelerator, "prepare", deepspeed_prepare)
    with pytest.raises(RecipeError, match=r"optim.grad_accum is 1 but Accelerate was configured with 4"):
        train(tiny_recipe())


def test_deepspeed_and_fsdp_launches_are_refused(tiny_recipe):
    """DeepSpeed steps inside backward: a NaN step was already in the weights when the log said "skipped",
    and the recipe's grad_clip went unused (its own config clips)."""
    import types

    from accelerate.utils import DistributedType

    from sak.config import RecipeError
    from sak.engine.launch import check_launch_settings

    fake = types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, gradient_accumulation_steps=1,
                                 state=types.SimpleNamespace(mixed_precision="no"))  # fmt: skip
    with pytest.raises(RecipeError, match=r"DeepSpeed steps the optimiser inside backward.*--multi_gpu \(DDP\)"):
        check_launch_settings(fake, tiny_recipe())
    # FSDP's checkpoints are pickled pytorch_model_fsdp*.bin files or shard folders: export and eval found nothing
    fsdp = types.SimpleNamespace(**{**vars(fake), "distributed_type": DistributedType.FSDP})
    with pytest.raises(RecipeError, match=r"FSDP is not supported: its checkpoints hold no model.safetensors.*DDP"):
        check_launch_settings(fsdp, tiny_recipe())
    ddp = types.SimpleNamespace(**{**vars(fake), "distributed_type": DistributedType.MULTI_GPU})
    check_launch_settings(ddp, tiny_recipe())
    ddp.state = types.SimpleNamespace(mixed_precision="bf16")  # (the cause named is precision's, not accumulation's)
    with pytest.raises(RecipeError, match=r"precision.mixed is 'no' but .* 'bf16' \(an Accelerate state made before"):
        check_launch_settings(ddp, tiny_recipe())


def test_epochs_with_accumulation_count_the_short_last_step_and_log_its_mean_loss(tiny_recipe, monkeypatch):
    """8 batches an epoch with grad_accum 3: Accelerate steps after batches 3, 6 and 8 (the end of the loader),
    so 2 epochs are 6 optimiser steps over all 64 samples, and each step logs the mean of its micro-batches'
    losses (2 of them in the short step), not their sum divided by 3, and the images it took (its
    images_per_s counted 3 micro-batches for 2)."""
    recipe = tiny_recipe(
        "schedule.max_steps=null", "schedule.epochs=2", "optim.grad_accum=3", "logging.sample_ids=true"
    )
    clock = [0.0]  # one second a micro-batch, whatever else the step does: 4 images/s throughout
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    record_ids = trainer_module.record_ids
    monkeypatch.setattr(trainer_module, "record_ids", lambda *a: clock.__setitem__(0, clock[0] + 1) or record_ids(*a))
    train(recipe)
    assert set(logged(recipe.run_dir, "images_per_s").values()) == {4.0}
    rows = [json.loads(x) for x in (recipe.run_dir / "samples" / "rank0.jsonl").read_text().splitlines()]
    per_step = [sum(r["step"] == s for r in rows) for s in range(1, 7)]
    assert per_step == [3, 3, 2, 3, 3, 2] and sum(len(r["ids"]) for r in rows) == 64
    losses = logged(recipe.run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    mean = sum(losses.values()) / 6
    assert losses[3] > 0.8 * min(losses[2], losses[4]) and abs(losses[3] - mean) < 0.5 * mean


def test_a_warm_up_as_long_as_the_run_is_said(tiny_recipe, capsys):
    """A run shortened for a test keeps its recipe's warm-up and never reaches optim.lr: allowed, but said, in
    whichever units the two are given (a warm-up in epochs is known in steps once the loader's length is)."""
    train(tiny_recipe("schedule.max_steps=2", "schedule.warmup_steps=0", "schedule.warmup_epochs=1"))
    assert "warning: the warm-up (8 steps) is longer than the run (2 steps)" in capsys.readouterr().out
    train(tiny_recipe("run.name=longer", "schedule.max_steps=3", "schedule.warmup_steps=2"))
    assert "warning: the warm-up" not in capsys.readouterr().out


@pytest.mark.parametrize("fused", [False, True])
def test_a_step_the_loss_scaler_skips_uses_up_its_place_in_the_schedule(tiny_recipe, monkeypatch, fused):
    """fp16's GradScaler skips a step whose gradients overflowed (here NaN at step 3; a fused AdamW inside its
    kernel). The schedule goes on by step count all the same, as the official loops step it by iteration
    (it was held back a step at each overflow, so a run ended short of its floor)."""
    NanGradientAtStepThree.calls = 0
    monkeypatch.setattr(launch_module, "Accelerator", ScaledOnCpu)
    recipe = tiny_recipe("loss.distill=test_nan_grad_at_3", "schedule.max_steps=6", "schedule.warmup_steps=4",
                         "optim.grad_clip=null", f"optim.fused={str(fused).lower()}")  # fmt: skip
    train(recipe)
    lrs = logged(recipe.run_dir, "lr")
    assert ScaledOnCpu.last.scaler.get_scale() == 2.0**11  # one overflow: the scale halved
    assert lrs[1] < lrs[2] < lrs[3] < lrs[4]  # the warm-up's, step by step


def test_steps_the_loss_scaler_skips_at_a_scale_of_1_or_less_count_as_non_finite(tiny_recipe, monkeypatch, capsys):
    """A NaN gradient at every step from step 3: the scaler skipped them all without a word (the loss finite), its
    scale halving forever, and the run ended "finished" on its step-2 weights. Skips at a scale above 1 are the
    scaler finding its scale; from 1 down (4096 halved 12 times: step 15) they are non-finite steps."""
    NanGradientFromStepThree.calls = 0
    monkeypatch.setattr(launch_module, "Accelerator", ScaledOnCpu)
    recipe = tiny_recipe("loss.distill=test_nan_grad_from_3", "schedule.max_steps=30", "optim.max_nonfinite=3")
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite .* at step 17") as info:
        train(recipe)
    assert "the fp16 loss scaler skipped the step, its gradients not finite at a loss scale of 0.25" in str(info.value)
    scales = logged(recipe.run_dir, "loss_scale")
    assert scales[1] == scales[2] == 4096 and scales[3] == 2048 and scales[17] == 0.125
    streaks = logged(recipe.run_dir, "nonfinite_streak")
    assert all(streaks[s] == 0 for s in range(1, 15)) and (streaks[15], streaks[16]) == (1, 2)
    assert "[sak] step 15: step skipped (1/3 in a row); the fp16 loss scaler" in capsys.readouterr().out


def test_images_per_second_after_an_evaluation_or_a_checkpoint_leaves_their_time_out(tiny_recipe, monkeypatch):
    """A clock that moves 1 s per read, and 1000 s in each evaluation and checkpoint save: the step after one
    logged images / (1000 s + its own), as if training had slowed down a thousandfold."""
    import types

    clock = [0.0]

    def perf_counter():
        clock[0] += 1.0
        return clock[0]

    def slow(function):
        def run(*args, **kwargs):
            clock[0] += 1000.0
            return function(*args, **kwargs)

        return run

    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(trainer_module, "evaluate", slow(trainer_module.evaluate))
    monkeypatch.setattr(trainer_module, "save_checkpoint", slow(trainer_module.save_checkpoint))
    recipe = tiny_recipe("schedule.max_steps=6", "eval.every=2", "checkpoint.every=3")
    train(recipe)
    rates = logged(recipe.run_dir, "images_per_s")
    assert min(rates.values()) > 4 / 100  # 4 images in a few ticks of 1 s, never in 1000 s


def test_an_empty_wandb_run_id_left_by_a_kill_is_replaced_not_handed_to_wandb(tmp_path):
    from sak.engine.logging import wandb_run_id

    first = wandb_run_id(tmp_path, continues=False)
    assert wandb_run_id(tmp_path, continues=True) == first
    (tmp_path / "sak_run_id").write_text("")  # written in place before: a kill in between left it empty
    again = wandb_run_id(tmp_path, continues=True)
    assert again and again != first and (tmp_path / "sak_run_id").read_text().strip() == again
