"""Resuming a run from a checkpoint: the prepared optimiser, scheduler and target normalisers loaded, with the
recipe changes a resume cannot take refused (the data position and the schedule's length)."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import load_file

from .checkpoint import (
    CheckpointError,
    TrainState,
    damaged,
    finished_state,
    first_misfit,
    load_checkpoint,
    optimiser_settings,
    restore_optimiser_settings,
)
from .run_records import FINAL_METRICS


def check_same_samples(source: Path, state: TrainState, samples: tuple[int, str | None], in_epochs: list[str]) -> None:
    """Refuse a resume whose training split is not the checkpoint's where that matters, whatever setting changed
    it (data.root, a dataset option, files added to the folder): inside an epoch, whose place is counted in the
    checkpoint's order of samples (the rest of the epoch would repeat some and skip others), and with a schedule
    in epochs, counted in steps of the checkpoint's epoch length. At an epoch's end, with a schedule in steps, it
    may change. (The caller leaves out runs with nothing left to train.)"""
    count, digest = samples
    was = f"{state.samples} samples" + (f", ids sha256 {state.samples_sha256[:12]}" if state.samples_sha256 else "")
    now = f"{count} samples" + (f", ids sha256 {digest[:12]}" if digest else "")
    ids_differ = state.samples_sha256 is not None and digest is not None and state.samples_sha256 != digest
    if (state.samples != count or ids_differ) and state.batch_in_epoch:
        raise CheckpointError(
            f"cannot resume from {source} with another training split ({was} -> {now}; data.root, data.options or "
            f"the files changed): it stopped {state.batch_in_epoch} batch(es) into epoch {state.epoch} of the "
            "checkpoint's order of samples. Resume with the checkpoint's data (it may change at a checkpoint taken at "
            f"an epoch's end), or start a new run from its weights (another run.name, and checkpoint.init_from={source})"
        )
    if state.samples != count and in_epochs:
        raise CheckpointError(
            f"cannot resume from {source} with a training split of another size ({was} -> {now}): "
            f"{' and '.join(in_epochs)} are counted in optimiser steps of an epoch of the checkpoint's size; the "
            f"{state.step} steps done and the schedule's length would not match. Resume with the checkpoint's data, "
            "give the schedule in steps (schedule.max_steps, warmup_steps), or start a new run from its weights "
            f"(another run.name, and checkpoint.init_from={source})"
        )


def resume_from(accelerator: Accelerator, source: Path, changed: list[str], optimizer, scheduler, normalizers,
                normalize: str, total: int, in_epochs: list[str] = (),
                samples: tuple[int, str | None] | None = None) -> TrainState:  # fmt: skip
    """Load a checkpoint into the prepared objects (the optimiser keeps the recipe's settings; the checkpoint
    brings back its moments and the schedule's position) and the target normaliser's statistics. `in_epochs`:
    the schedule's lengths given in epochs (schedule.epochs, schedule.warmup_epochs), which are counted in
    optimiser steps of the recipe's batch size and grad_accum. `samples`: this recipe's training split, (count,
    sha256 of the ordered ids), against the checkpoint's (TrainState.samples)."""
    settings = optimiser_settings(optimizer)  # the recipe's; the checkpoint brings its own run's back
    finished_elsewhere = finished_state(source, total, accelerator.num_processes)
    if finished_elsewhere is not None:  # nothing to load: the trainer returns its final metrics
        return finished_elsewhere
    state = load_checkpoint(accelerator, source, changed)
    # The place in the epoch counts loader batches of the checkpoint's size, which grouped into optimiser steps of
    # its grad_accum: a resume mid-epoch with others would repeat or skip samples, or weight an epoch's last
    # micro-batches wrongly. At an epoch's end both may change.
    moved = [c for c in changed if c.startswith(("data.batch_size:", "optim.grad_accum:"))]
    finished = state.step >= total and (source / FINAL_METRICS).is_file()
    # nothing to train: a finished run, or one at its end whose final evaluation is to run again (with a schedule
    # in epochs the end is the new settings' own, which the refusals below are about: only a finished run)
    done = finished or (state.step >= total and not in_epochs)
    if moved and state.batch_in_epoch and not done:
        raise CheckpointError(
            f"cannot resume from {source} with another {' and another '.join(c.split(':')[0] for c in moved)} "
            f"({'; '.join(moved)}): it stopped {state.batch_in_epoch} batch(es) into epoch {state.epoch}, a place "
            "counted in the checkpoint's batches. Resume with the checkpoint's values (they may change at a "
            f"checkpoint taken at an epoch's end), or start a new run from its weights (another run.name, and "
            f"checkpoint.init_from={source})"
        )
    # the epoch's order of samples: another seed draws another permutation, another split / subset / dataset
    # other samples; the rest of the epoch would repeat some and skip others. At an epoch's end they may change.
    reordered = [c for c in changed if c.startswith(("run.seed:", "data.name:", "data.split:", "data.subset:"))]
    if reordered and state.batch_in_epoch and not done:
        raise CheckpointError(
            f"cannot resume from {source} with another {' and another '.join(c.split(':')[0] for c in reordered)} "
            f"({'; '.join(reordered)}): it stopped {state.batch_in_epoch} batch(es) into epoch {state.epoch} of "
            "the checkpoint's order of samples, which these change. Resume with the checkpoint's values (they may "
            f"change at a checkpoint taken at an epoch's end), or start a new run from its weights (another "
            f"run.name, and checkpoint.init_from={source})"
        )
    if moved and in_epochs and not finished:  # its steps so far are the old size's; the length would be the new one's
        raise CheckpointError(
            f"cannot resume from {source} with another {' and another '.join(c.split(':')[0] for c in moved)} "
            f"({'; '.join(moved)}): {' and '.join(in_epochs)} are counted in optimiser steps, which the checkpoint "
            f"took of the old size; the {state.step} steps done and the schedule's length would not match (the run "
            "would end early, or train past its epochs with the learning rate rising again). Resume with the "
            "checkpoint's values, give the schedule in steps (schedule.max_steps, warmup_steps), or start a new run "
            f"from its weights (another run.name, and checkpoint.init_from={source})"
        )
    if samples is not None and state.samples is not None and not done:  # (after those naming the setting changed)
        check_same_samples(source, state, samples, in_epochs)
    restore_optimiser_settings(optimizer, scheduler, settings)
    if normalizers is not None:
        saved = source / "target_normalizers.safetensors"
        if not saved.is_file():
            raise CheckpointError(
                f"cannot resume from {source}: it holds no target statistics, as its run had loss.normalize none "
                f"and this recipe has {normalize}; start a new run (another run.name, or checkpoint.resume=never)"
            )
        try:
            normalizers.load_state_dict(load_file(str(saved)))
        except RuntimeError as exc:
            if "loading state_dict" not in str(exc):
                raise CheckpointError(damaged(source, exc)) from exc
            # the statistics of other teachers' levels, or of another loss.normalize mode
            differs = f"; the recipe differs from the one it was trained with: {'; '.join(changed)}" if changed else ""
            raise CheckpointError(
                f"cannot resume from {source}: its target statistics do not fit this recipe's loss.normalize "
                f"({first_misfit(exc)}){differs}. Start a new run instead (another run.name, or "
                "checkpoint.resume=never)"
            ) from exc
        except Exception as exc:  # cut short or overwritten
            raise CheckpointError(damaged(source, exc)) from exc
    return state
