"""The training loop, in one place: build, prepare, resume, then a visible step loop."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from ..config import Recipe
from ..digest import hash_threads, local_processes
from ..files import write_text_whole
from ..student import parameter_report
from . import build
from .build import teacher_dtype
from .cache import (
    FeatureCache,
    cache_digest,
    content_digests,
    identity,
    ids_digest,
    teachers_identity,
    training_dataset,
)
from .checkpoint import (
    TrainState,
    add_to_checkpoint,
    latest_checkpoint,
    on_every_process,
    save_checkpoint,
)
from .evaluate import HeldOutTargets, evaluate
from .fit import check_samples_fit
from .init import init_run_from, one_checkpoint
from .launch import check_launch_settings, make_accelerator
from .logging import GpuPeak, RunLogger, json_safe, nan_for_null, run_info
from .malloc import keep_freed_memory
from .prefetch import DevicePrefetcher, prefetch_enabled
from .resume import resume_from
from .run_records import (
    CACHE_FILE,
    FINAL_METRICS,
    TEACHERS_FILE,
    changes_message,
    changes_since,
    prepare_run_dir,
    record_ids,
    record_start,
)
from .schedule import lr_lambda
from .step import RunningStatistics, begin_step, compute_losses, nonfinite_cause, teacher_targets


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is kept."""


def skip_first_batches(accelerator: Accelerator, loader, batches: int):
    """The prepared `loader` without its first `batches` (a run resumed mid-epoch), configured as the loader:
    Accelerate (1.15) rebuilds it without the asynchronous host-to-device copies and drop_last flag it was
    prepared with (huggingface/accelerate#4295), so the rest of the resumed epoch would copy synchronously."""
    skipped = accelerator.skip_first_batches(loader, batches)
    for name in ("_non_blocking", "_drop_last"):
        if hasattr(loader, name) and hasattr(skipped, name):
            setattr(skipped, name, getattr(loader, name))
    return skipped


def open_cache(recipe: Recipe, teachers: dict, dataset=None, cache: FeatureCache | None = None) -> FeatureCache | None:
    """The recipe's teacher-feature cache (`cache`, if already opened), checked against the recipe's teachers
    and data. `dataset`: the training dataset, if already built (its sample ids are part of the check; built
    again otherwise)."""
    if recipe.cache.path is None:
        return None
    cache = cache or FeatureCache(Path(recipe.cache.path))
    built = cache.manifest["identity"]
    if dataset is None:
        dataset = training_dataset(recipe, built["augment"])
    digests = content_digests(dataset, shared=True)  # (every process of a launch opens the cache)
    cache.check(identity(recipe, teachers, built["views"], built["augment"], built["dtype"], dataset, digests), digests)
    return cache


def cache_facts(cache: FeatureCache) -> dict:
    """What a checkpoint records of the cache it trained from (cache.json): a cache rebuilt at the same path
    with other settings, or from other images, differs in these although the recipe does not."""
    return {
        "path": str(cache.root),
        "dtype": cache.dtype,
        "views": cache.views,
        "augment": cache.augment,
        "manifest_sha256": cache_digest(cache.root),
    }


def gradient_norm(student: torch.nn.Module) -> torch.Tensor:
    """The 2-norm of the student's gradients (all-reduced already under DDP), for the non-finite check."""
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # one launch for all the per-tensor norms (what clip_grad_norm_ does; torch.nn.utils.get_total_norm needs 2.6)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def keep_gradient_buffers(student: torch.nn.Module, recipe: Recipe, device: torch.device) -> bool:
    """With CUDA graphs (precision.compile_mode on a CUDA device) and gradient accumulation, give every trainable
    parameter a zero .grad made here, outside any graph, for the trainer to zero in place after each step rather
    than free; returns whether it did. A backward graph's outputs are overwritten when it runs again, and the
    first micro-batch's gradients would be such outputs, still to be added to (PyTorch's advice for this case).
    A parameter given no gradient in a step is then stepped by AdamW with zeros; without CUDA graphs nothing
    changes."""
    if not (recipe.precision.cuda_graphs and recipe.optim.grad_accum > 1 and device.type == "cuda"):
        return False
    for param in student.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    return True


def train(recipe: Recipe) -> dict:
    """Run the recipe; returns the final evaluation. Safe to call again: `resume: auto` continues."""
    with contextlib.ExitStack() as closing:  # the run's trackers closed however it ends (a notebook calls again)
        return run_recipe(recipe, closing)


def run_recipe(recipe: Recipe, closing: contextlib.ExitStack) -> dict:
    """`train`'s body; `closing` closes the run's logger (its trackers, their writer threads) when it ends."""
    accelerator = make_accelerator(recipe)
    if accelerator.device.type == "cpu" and recipe.run.tune_malloc:
        keep_freed_memory()  # large tensors freed each step stay in the process (sak/engine/malloc.py)
    set_seed(recipe.run.seed)
    run_dir, ckpt_root = recipe.run_dir, recipe.run_dir / "checkpoints"
    extra_files = {  # written next to the run and into every checkpoint
        "recipe.yaml": recipe.to_yaml(),
        "run_info.json": json.dumps(run_info(recipe, accelerator.num_processes), indent=2),
    }
    # the main process's error raised in every process: the others would otherwise wait at the next barrier,
    # which only a launcher that stops them all on one failure (torchrun's, not every cluster's) ends
    main = accelerator.is_main_process
    prepare = lambda: prepare_run_dir(recipe) if main else None  # noqa: E731
    set_aside_to = on_every_process(accelerator, prepare, "could not prepare the run directory")

    # -- build ------------------------------------------------------------------------------
    teachers = build.build_teachers(recipe, accelerator.device)
    # each teacher as built, what the recipe leaves to sak included (default levels, sizes): a resume compares it
    extra_files[TEACHERS_FILE] = json.dumps(teachers_identity(recipe, teachers), indent=2)
    tasks = build.build_tasks(recipe)
    student = build.build_student(recipe, teachers, tasks)
    n = accelerator.num_processes
    sync_note = build.sync_batch_norm(student, n, accelerator.device) if recipe.student.sync_bn else None
    resume = recipe.checkpoint.resume
    source = latest_checkpoint(ckpt_root) if resume == "auto" else (None if resume == "never" else Path(resume))
    distill_loss = build.build_distill_loss(recipe)
    normalizers = build.build_target_normalizers(recipe, teachers)
    init = recipe.checkpoint.init_from and source is None  # (a resumed run's checkpoint holds the weights since)
    init_from = one_checkpoint(accelerator, Path(recipe.checkpoint.init_from)) if init else None  # (one for all)
    init_note = init_run_from(student, normalizers, init_from) if init else None
    if normalizers is not None:
        normalizers.to(accelerator.device)
    # the manifest says whether the cache holds augmented views, which the training dataset must match; the
    # whole cache is checked against that dataset (its sample ids included) once it is built
    cached = FeatureCache(Path(recipe.cache.path)) if recipe.cache.path is not None else None
    train_loader = build.build_loader(recipe, recipe.data.split, train=True, augment=cached and cached.augment)
    cache = open_cache(recipe, teachers, train_loader.dataset.dataset, cached)
    if cache is not None:
        # which cache fed the training, in every checkpoint: a resume names one rebuilt with other settings
        facts = cache_facts(cache)
        extra_files[CACHE_FILE] = json.dumps(facts, indent=2)
        train_loader.dataset.views = cache.views
        train_loader.dataset.cache = cache  # each batch's maps: read by the loader (IndexedDataset.collate)
        # every shard hashed once, here, split over the processes: not again in every worker of every epoch,
        # nor once per process (N reads of a cache that may not fit in the page cache)
        cache.verify_all(
            hash_threads(local_processes(n)), (accelerator.process_index, n), gather_object if n > 1 else None
        )
    val_loader = build.build_loader(recipe, recipe.eval.split, train=False, batch_size=recipe.eval.batch_size)
    for loader in (train_loader, val_loader):  # before any step, not at the final evaluation
        check_samples_fit(student, loader.dataset.dataset, teachers)
    optimizer = build.build_optimizer(recipe, student)
    build.prepare_student(student, recipe.precision)
    per_epoch = len(train_loader) // accelerator.num_processes
    if per_epoch == 0:  # each process's share of the batches would be empty: epochs without a step, forever
        raise ValueError(
            f"data: split {recipe.data.split!r} has {len(train_loader.dataset)} samples, {len(train_loader)} whole "
            f"batch(es) of data.batch_size={recipe.data.batch_size}: fewer than one for each of the "
            f"{accelerator.num_processes} processes; use a smaller data.batch_size or fewer processes"
        )
    total = build.total_steps(recipe, per_epoch)
    warmup = build.warmup_steps(recipe, per_epoch)
    # Accelerate divides every micro-batch's loss by grad_accum, also in an epoch's last step when that has only
    # r < grad_accum micro-batches (the end of the loader ends the step): its gradient would be r / grad_accum
    # of their mean while its logged loss is their mean. Those micro-batches' losses are scaled by grad_accum / r.
    accum = recipe.optim.grad_accum
    short_from, short = per_epoch // accum * accum, per_epoch % accum
    s = recipe.schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(s.name, total, warmup, recipe.optim.lr, s.min_lr, s.power)
    )
    # with data.prefetch_to_device the prefetcher, not Accelerate, moves training batches to the device
    reads_ahead = prefetch_enabled(
        recipe.data.prefetch_to_device, accelerator.device, cache is not None, recipe.optim.grad_accum
    )
    prefetch = DevicePrefetcher(accelerator.device) if reads_ahead else None
    student, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        student, optimizer, train_loader, val_loader, scheduler,
        device_placement=[None, None, False if prefetch else None, None, None],
    )  # fmt: skip
    check_launch_settings(accelerator, recipe)  # (a DeepSpeed config's grad_accum is applied by prepare)
    tdtype = teacher_dtype(recipe)
    held_out = HeldOutTargets(recipe.eval.keep_targets_gib * 2**30)  # the teachers' outputs on the held-out images
    gpu = GpuPeak(accelerator.device)

    def evaluate_now() -> dict[str, float]:
        """Evaluate, log the row (with the evaluation's GPU peak) and return its metrics."""
        metrics, memory = gpu.evaluation(lambda: evaluate(accelerator, student, teachers, val_loader, tasks,
                                                          distill_loss, recipe, tdtype, normalizers, held_out))  # fmt: skip
        logger.log(state.step, {**metrics, **memory})
        return metrics

    def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(tensor, "sum")

    def clip_grad_norm():
        return accelerator.clip_grad_norm_(student.parameters(), recipe.optim.grad_clip)

    def saved_tensors() -> dict[str, dict]:
        return {} if normalizers is None else {"target_normalizers": normalizers.state_dict()}

    def saved_state() -> TrainState:
        """The state a checkpoint records: after an epoch's last batch, the next epoch's start (the same place,
        in words a resume with another data.batch_size or optim.grad_accum can take up)."""
        if state.batch_in_epoch >= len(train_loader):
            return dataclasses.replace(state, epoch=state.epoch + 1, batch_in_epoch=0)
        return state

    # -- resume -----------------------------------------------------------------------------
    state = TrainState()
    logger_start = 0
    samples = (len(train_loader.dataset.dataset), ids_digest(train_loader.dataset.dataset))
    changed = changes_since(source, recipe, extra_files) if source is not None else []
    if source is not None:
        in_epochs = [f"schedule.{k}" for k in ("epochs", "warmup_epochs") if getattr(recipe.schedule, k)]
        args = (accelerator, source, changed, optimizer, scheduler, normalizers, recipe.loss.normalize, total,
                in_epochs, samples)  # fmt: skip
        state = on_every_process(accelerator, lambda: resume_from(*args))  # before the main process records it
        logger_start = state.step
    elif accelerator.num_processes > 1:
        # Every process was seeded alike so that they built the same modules; training's random draws (the noisy
        # router's noise, drop path, dropout) must differ between them, or each process's shard of the global
        # batch repeats the same draws. A resume restores each process's own saved state instead.
        set_seed((recipe.run.seed + accelerator.process_index) % 2**32)  # (numpy's seeds stop at 2**32 - 1)
    state.samples, state.samples_sha256 = samples  # (what this start trains on, in its checkpoints)
    finished = source / FINAL_METRICS if source is not None else None
    done = finished is not None and state.step >= total and finished.is_file()  # the whole run again: nothing to do
    abandoned = None
    if accelerator.is_main_process:
        abandoned = record_start(recipe, source, state.step, extra_files, finished if done else None)
    accelerator.wait_for_everyone()
    stopped = recipe.run.stop_at is not None and recipe.run.stop_at <= state.step < total  # resumed at or past it
    logger = RunLogger(accelerator, recipe, total, logger_start, trains=not (done or stopped))
    # wandb's exit codes for a run ended by an exception (255: Ctrl-C, as its own hook records it), else finished
    closing.push(lambda kind, *_: logger.close(0 if kind is None else 255 if kind is KeyboardInterrupt else 1))
    report = parameter_report(accelerator.unwrap_model(student))
    logger.message(
        f"[sak] {recipe.run.name}: {accelerator.num_processes} process(es) on {accelerator.device}, "
        f"{total} steps; parameters {json.dumps(report)}"
        + ("; each batch copied to the device during the step before (data.prefetch_to_device)" if prefetch else "")
    )
    if source is not None:
        logger.message(f"[sak] resumed from {source} at step {state.step}")
        if changed:
            logger.message(changes_message(source, changed, done))
    for note in (init_note, sync_note):
        if note is not None:
            logger.message(note)
    if set_aside_to is not None:
        logger.message(f"[sak] checkpoint.resume=never: the checkpoints already in {ckpt_root} moved to {set_aside_to}")
    if abandoned is not None:
        logger.message(f"[sak] the checkpoints after step {state.step} in {ckpt_root} moved to {abandoned}")
    if 0 < total < warmup:  # (a run shortened for a test keeps its recipe's warm-up: allowed, but said)
        logger.message(f"[sak] warning: the warm-up ({warmup} steps) is longer than the run ({total} steps): the "
                       "learning rate never reaches optim.lr; shorten schedule.warmup_steps / warmup_epochs too")  # fmt: skip
    if done:
        asks = "" if state.step == total else f" (this recipe asks for {total})"
        logger.message(
            f"[sak] {recipe.run.name} finished already, at step {state.step}{asks} (final metrics in {finished}); "
            "to train on, raise the schedule's length"
        )
        return nan_for_null(json.loads(finished.read_text()))
    go_on = "resume with a higher run.stop_at, or without it" + (
        " (and checkpoint.resume=auto)" if recipe.checkpoint.resume == "never" else ""
    )
    if stopped:
        logger.message(
            f"[sak] at step {state.step} already, run.stop_at={recipe.run.stop_at}: nothing to train; to go on, {go_on}"
        )
        return {}

    if recipe.eval.at_start and state.step == 0:
        evaluate_now()

    # -- loop -------------------------------------------------------------------------------
    stable_grads = keep_gradient_buffers(student, recipe, accelerator.device)
    running = RunningStatistics(student)
    images_per_micro_batch = recipe.data.batch_size * accelerator.num_processes
    alpha = recipe.loss.alpha if tasks else 1.0
    student.train()
    window: torch.Tensor | None = None  # the step's logged losses, summed over its micro-batches
    micro = 0  # micro-batches in the window
    step_images: list[torch.Tensor] = []  # each micro-batch's, looked at again if the step is skipped
    # fp16: the loss scaler's scale, which it halves at each step it skips for inf / NaN gradients
    loss_scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else None
    tick, compute_time = time.perf_counter(), 0.0
    while state.step < total:
        train_loader.set_epoch(state.epoch)  # the sample order
        train_loader.dataset.set_epoch(state.epoch)  # the augmentation (Accelerate sets only one of the two)
        batches = (
            skip_first_batches(accelerator, train_loader, state.batch_in_epoch)
            if state.batch_in_epoch
            else train_loader
        )
        if prefetch is not None:
            batches = prefetch(batches)
        for batch in batches:
            batch_arrived = time.perf_counter()
            begin_step(recipe.precision.cuda_graphs)
            if window is None:  # a step's first micro-batch
                running.keep()
                step_images = []
            step_images.append(batch["image"])
            with accelerator.accumulate(student):
                if cache is not None:
                    targets = cache.targets(batch["cached"], accelerator.device)
                else:
                    targets = teacher_targets(teachers, batch["image"], tdtype)
                if normalizers is not None:
                    normalizers.update(
                        targets,
                        state.step,
                        reduce=reduce_sum if accelerator.num_processes > 1 else None,
                        rebuild=window is None,  # the map: once a step, so its micro-batches share it
                    )
                    targets = normalizers(targets)
                with accelerator.autocast():
                    out = student(batch["image"])
                losses = compute_losses(out, targets, batch, tasks, distill_loss, alpha)
                short_window = short and state.batch_in_epoch >= short_from
                accelerator.backward(losses.total * (accum / short) if short_window else losses.total)
                # the logged losses of this micro-batch as one tensor: a stack (and with accumulation an add)
                # whatever the number of terms; a step reduces and reads them once
                scalars = losses.scalars_tensors()
                keys = list(scalars)
                logged = torch.stack(list(scalars.values())).detach().float()
                window, micro = (logged, 1) if window is None else (window + logged, micro + 1)
                # (else they live on through an evaluation or a checkpoint save: a batch's float32 targets, 1 GB
                # from a cached batch of stage 1's GPU configuration, and the student's maps with their graph)
                del targets, out, losses, scalars, logged
            compute_time += time.perf_counter() - batch_arrived
            state.batch_in_epoch += 1
            if recipe.logging.sample_ids:
                record_ids(recipe.run_dir, accelerator.process_index, state.step + 1, batch["id"])
            if not accelerator.sync_gradients:
                continue
            step_arrived = time.perf_counter()
            # Clipped before the losses are read, so that the norm comes back in the same read (a step whose loss
            # or gradient norm is not finite is skipped below, whatever clipping did to its gradients); after, with
            # fp16's GradScaler: its unscale_ may run once per optimiser step, and a skipped step makes none (the
            # scaler itself skips steps with non-finite gradients). Without clipping the norm is still taken: a
            # finite loss with a NaN gradient (an overflow in backward) would otherwise be stepped into the weights.
            clip_first = recipe.optim.grad_clip is not None and accelerator.scaler is None
            if clip_first:
                grad_norm = clip_grad_norm()
            elif accelerator.scaler is None:
                grad_norm = gradient_norm(student)
            else:
                grad_norm = None
            if micro > 1:  # the mean over the step's micro-batches (fewer than grad_accum at an epoch's end)
                window = window / micro
            if isinstance(grad_norm, torch.Tensor):
                window = torch.cat([window, grad_norm.detach().float().reshape(1).to(window.device)])
            reduced = accelerator.reduce(window, "mean").tolist()  # the step's one read from the device
            values, window = dict(zip(keys, reduced[: len(keys)], strict=True)), None
            if isinstance(grad_norm, torch.Tensor):
                values["grad_norm"] = reduced[-1]
            values["lr"] = scheduler.get_last_lr()[0]  # the lr this step used
            if math.isfinite(values["loss"]) and math.isfinite(values.get("grad_norm", 0.0)):
                if recipe.optim.grad_clip is not None and not clip_first:
                    values["grad_norm"] = float(clip_grad_norm())
                optimizer.step()  # (with fp16, the scaler skips it on an overflow the loss did not show)
                overflow_at = None
                if loss_scale is not None:  # fp16: a skipped step halved the scale (read: a wait, as unfused ones)
                    scale_before, loss_scale = loss_scale, accelerator.scaler.get_scale()
                    values["loss_scale"] = loss_scale
                    overflow_at = scale_before if loss_scale < scale_before else None
                if overflow_at is None:
                    state.nonfinite_streak = 0
                elif overflow_at <= 1:  # (above 1, a skip is the scaler finding its scale): not finite unscaled
                    state.nonfinite_streak += 1
                    cause = (
                        f"; the fp16 loss scaler skipped the step, its gradients not finite at a loss scale of "
                        f"{overflow_at:g} (a NaN, or beyond float16's range: precision.mixed=bf16 has float32's)"
                    )
                    logger.message(f"[sak] step {state.step + 1}: step skipped ({state.nonfinite_streak}/"
                                   f"{recipe.optim.max_nonfinite} in a row){cause}")  # fmt: skip
            else:
                running.restore()  # (the step's forward folded its batch into the heads' running statistics)
                state.nonfinite_streak += 1
                begin_step(recipe.precision.cuda_graphs)  # (the teachers run again, as before any step)
                online, gather = {} if cache is not None else teachers, gather_object if n > 1 else None
                cause = nonfinite_cause(online, step_images, tdtype, gather)
                logger.message(
                    f"[sak] step {state.step + 1}: non-finite loss {values['loss']} or gradient norm "
                    f"{values.get('grad_norm')}, step skipped ({state.nonfinite_streak}/{recipe.optim.max_nonfinite} "
                    f"in a row){cause}"
                )
            # the lr follows the step count, skipped steps included, as the official loops' (by iteration): a
            # schedule held back at each skip would end short of its floor when the run stops at its last step
            with warnings.catch_warnings():  # (PyTorch's "lr_scheduler.step() before optimizer.step()" at a skip)
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            optimizer.zero_grad(set_to_none=not stable_grads)
            state.step += 1
            step_images, batch = [], None  # (not kept through an evaluation or a checkpoint's save)
            # step_time: compute of this step without waiting for data; images_per_s: wall clock between steps
            values["step_time"], compute_time = compute_time + time.perf_counter() - step_arrived, 0.0
            values["nonfinite_streak"] = state.nonfinite_streak
            if state.nonfinite_streak >= recipe.optim.max_nonfinite:
                logger.log(state.step, {**values, **gpu.steps()})
                last = latest_checkpoint(ckpt_root)
                raise NonFiniteLossError(
                    f"{recipe.optim.max_nonfinite} consecutive non-finite losses or gradient norms at step "
                    f"{state.step}; stopping. "
                    + (f"The last good checkpoint is {last}" if last is not None else "There is no checkpoint yet")
                    + (f"{cause}." if cause else " (lower optim.lr, enable optim.grad_clip or check the data).")
                )
            now = time.perf_counter()
            values.update(images_per_s=images_per_micro_batch * micro / max(now - tick, 1e-9))  # (micro: this step's)
            tick = now
            if state.step % recipe.logging.every == 0 or state.step == total:
                logger.log(state.step, {**values, **gpu.steps()})
            logger.progress(1, {k: values[k] for k in ("loss", "lr", "images_per_s")})
            if recipe.eval.every and state.step % recipe.eval.every == 0 and state.step < total:
                evaluate_now()
                student.train()
            # no checkpoint in a non-finite streak: pruning could otherwise drop the last good ones
            periodic = recipe.checkpoint.every and state.step % recipe.checkpoint.every == 0
            if periodic and state.step < total and state.nonfinite_streak == 0:
                save_checkpoint(
                    accelerator, ckpt_root, saved_state(), extra_files, recipe.checkpoint.keep_last, saved_tensors()
                )
            if (recipe.eval.every and state.step % recipe.eval.every == 0) or periodic:
                tick = time.perf_counter()  # the next step's images_per_s: its own time, not this evaluation's
            if recipe.run.stop_at is not None and state.step >= recipe.run.stop_at and state.step < total:
                if state.nonfinite_streak == 0 and not periodic:  # (a periodic save of this step just ran)
                    save_checkpoint(
                        accelerator, ckpt_root, saved_state(), extra_files, recipe.checkpoint.keep_last, saved_tensors()
                    )
                last = latest_checkpoint(ckpt_root)
                saved = (
                    "no checkpoint of it (in a non-finite streak), so a resume starts "
                    + (f"from {last}" if last is not None else "afresh: there is no checkpoint yet")
                    if state.nonfinite_streak
                    else "checkpoint saved"
                )
                logger.message(f"[sak] stopped at step {state.step} (run.stop_at), {saved}; to go on, {go_on}")
                return {}
            if state.step >= total:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    batches = None  # the prefetching generator let go: its loader's workers and the batches it sent ahead

    # -- finish -----------------------------------------------------------------------------
    # saved before the final evaluation, which may be long and may fail (out of memory at eval.batch_size, a kill):
    # the trained steps are kept whatever happens to it, and a start after such a failure evaluates again
    at_end = source is not None and logger_start == state.step and source.resolve().parent == ckpt_root.resolve()
    # (not saved again when this run's own checkpoint of this step was resumed to evaluate: another run's is saved)
    # in a non-finite streak, nothing pruned (as no periodic save is made in one): the steps since the last good one
    keep = 0 if state.nonfinite_streak else recipe.checkpoint.keep_last
    last = (
        source if at_end else save_checkpoint(accelerator, ckpt_root, saved_state(), extra_files, keep, saved_tensors())
    )
    final = evaluate_now()
    text = json.dumps(json_safe(final), indent=2)
    # the final checkpoint holds its metrics too: a start after the end finds them there and trains nothing
    add_to_checkpoint(accelerator, last, FINAL_METRICS, text)
    if accelerator.is_main_process:
        write_text_whole(run_dir / FINAL_METRICS, text)
    logger.message(f"[sak] done: {json.dumps(final)}")
    return final
