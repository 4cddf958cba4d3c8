"""Held-out evaluation during and after training: per-teacher feature cosine, distillation and task
losses, averaged over every image of the split across all processes."""

from __future__ import annotations

import math

import torch

from ..config import Recipe
from ..student import StudentOutput
from ..teachers import TeacherOutput
from .step import begin_step, compute_losses, feature_cosines, teacher_targets

KEEP = "_keep"  # per image: 1 for a real image inside the first eval.batches global batches, else 0


class HeldOutTargets:
    """The teachers' outputs on the held-out batches, kept in host memory from the first evaluation of a run for
    the later ones, up to `budget` bytes (`eval.keep_targets_gib`); batches past it run the teachers each time.
    The held-out crops are fixed and the teachers frozen, so the outputs are the same: recomputing them was most
    of every evaluation after the first (the demo's: 7.0 s with the teachers, 1.0 s from the kept 320 MiB on 2
    CPU cores; benchmarks/results/held_out_eval_cpu.md)."""

    def __init__(self, budget: float) -> None:
        self.budget, self.used, self.kept = budget, 0, {}

    def __call__(self, teachers, batch: dict, dtype) -> dict[str, TeacherOutput]:
        key = tuple(batch["index"].tolist())
        device = batch["image"].device
        kept = self.kept.get(key)
        if kept is not None:
            return {tid: _copied(out, device) for tid, out in kept.items()}
        targets = teacher_targets(teachers, batch["image"], dtype)
        size = sum(t.numel() * t.element_size() for out in targets.values() for t in _tensors(out))
        if self.used + size <= self.budget:
            self.kept[key] = {tid: _copied(out, torch.device("cpu")) for tid, out in targets.items()}
            self.used += size
        return targets


def _tensors(out: TeacherOutput) -> list[torch.Tensor]:
    return [*out.levels, *([out.summary] if out.summary is not None else [])]


def _copied(out: TeacherOutput, device: torch.device) -> TeacherOutput:
    """A copy of `out` on `device` (a copy there too: what is kept is never handed out)."""
    summary = None if out.summary is None else out.summary.to(device, copy=True)
    return TeacherOutput(tuple(t.to(device, copy=True) for t in out.levels), summary)


def real_images(accelerator, loader, n: int) -> int:
    """How many of this process's `n` images are the split's own, not padding. On N processes the prepared
    loader completes the last round of batches with images from the split's start, so that every process
    gets `n` (Accelerate's even_batches); of the N x n images gathered from that round (process order), the
    first `remainder` (split size % (n x N)) are real, as `gather_for_metrics` assumes. A loader that
    Accelerate did not prepare has no padding."""
    if not getattr(loader, "end_of_dataloader", False) or getattr(loader, "remainder", -1) <= 0:
        return n
    return min(max(loader.remainder - accelerator.process_index * n, 0), n)


@torch.no_grad()
def evaluate(
    accelerator,
    student,
    teachers,
    loader,
    tasks,
    distill_loss,
    recipe: Recipe,
    dtype,
    normalizers=None,
    held_out: HeldOutTargets | None = None,
) -> dict[str, float]:
    """Means over the split's images, or with `eval.batches` B over its first B batches of `eval.batch_size`
    whatever the number of processes N: the prepared loader hands global batch g to process g % N, so each
    process runs ceil(B / N) batches (every process takes part in every gather) and the batches past B are
    masked out. The losses are batch means, each image weighted by its batch's; the padding of the last round
    (`real_images`) is left out of the batch before anything runs, so that it weighs in neither the losses
    nor the means. `held_out`: the teachers' outputs kept from an earlier evaluation of the run (and kept here)."""
    student.eval()
    sums: dict[str, torch.Tensor] = {}
    count = 0
    limit, processes = recipe.eval.batches, accelerator.num_processes
    rounds = math.ceil(limit / processes) if limit else None
    for i, batch in enumerate(loader):
        if rounds is not None and i >= rounds:
            # Accelerate (1.15) unregisters its loader only at the end of the iteration; left registered, it
            # would hide the training loader's end of epoch from gradient accumulation
            if hasattr(loader, "end"):
                loader.end()
            break
        n = batch["image"].shape[0]
        real = real_images(accelerator, loader, n)
        if real < n:  # (a process with no real image runs one, so that it has every key to gather)
            batch = {k: v[: max(real, 1)] for k, v in batch.items()}
        begin_step(recipe.precision.cuda_graphs)
        targets = (
            teacher_targets(teachers, batch["image"], dtype) if held_out is None else held_out(teachers, batch, dtype)
        )
        with accelerator.autocast():
            out = student(batch["image"])
        # the student predicts normalised targets with loss.normalize: compared in the teacher's own space, as without
        raw = out if normalizers is None else StudentOutput(features=normalizers.denormalize(out.features))
        per_image = {}
        for tid, (plain, spatial) in feature_cosines(raw, targets).items():
            per_image |= {f"val/cosine/{tid}": plain, f"val/spatial_cosine/{tid}": spatial}
        if normalizers is not None:
            targets = normalizers(targets)
        losses = compute_losses(out, targets, batch, tasks, distill_loss, recipe.loss.alpha if tasks else 1.0)
        ran = batch["image"].shape[0]
        per_image.update({f"val/{k}": v.detach().float().expand(ran) for k, v in losses.scalars_tensors().items()})
        # every process gathers n values per key (the gather needs equal shapes); KEEP marks the ones that count
        per_image = {k: torch.cat([v.float(), v.new_zeros(n - ran, dtype=torch.float32)]) for k, v in per_image.items()}
        inside = not limit or i * processes + accelerator.process_index < limit
        per_image[KEEP] = (torch.arange(n, device=batch["image"].device) < real).float() * float(inside)
        gathered = accelerator.gather(per_image)
        keep = gathered.pop(KEEP)
        for key, value in gathered.items():
            sums[key] = sums.get(key, 0.0) + torch.where(keep > 0, value, 0.0).sum()
        count = count + keep.sum()  # (a tensor: read once, at the end)
    images = max(float(count), 1.0)
    return {k: (v / images).item() for k, v in sums.items()}
