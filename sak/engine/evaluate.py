"""Held-out evaluation during and after training: per-teacher feature cosine, distillation and task
losses, averaged over every image of the split across all processes."""

from __future__ import annotations

import math

import torch

from ..config import Recipe
from ..student import StudentOutput
from .step import compute_losses, feature_cosines, teacher_targets

KEEP = "_keep"  # per image: 1 inside the first eval.batches global batches, else 0


@torch.no_grad()
def evaluate(
    accelerator, student, teachers, loader, tasks, distill_loss, recipe: Recipe, dtype, normalizers=None
) -> dict[str, float]:
    """Means over the split's images, or with `eval.batches` B over its first B batches of `eval.batch_size`
    whatever the number of processes N: the prepared loader hands global batch g to process g % N, so each
    process runs ceil(B / N) batches (every process takes part in every gather) and the batches past B are
    masked out."""
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
        targets = teacher_targets(teachers, batch["image"], dtype)
        with accelerator.autocast():
            out = student(batch["image"])
        if normalizers is None:
            per_image = {f"val/cosine/{k}": v for k, v in feature_cosines(out, targets).items()}
        else:  # the student predicts normalised targets: compare in the teacher's own space, as without
            raw = StudentOutput(features=normalizers.denormalize(out.features))
            per_image = {f"val/cosine/{k}": v for k, v in feature_cosines(raw, targets).items()}
            targets = normalizers(targets)
        losses = compute_losses(out, targets, batch, tasks, distill_loss, recipe.loss.alpha if tasks else 1.0)
        n = batch["image"].shape[0]
        per_image.update({f"val/{k}": v.detach().float().expand(n) for k, v in losses.scalars_tensors().items()})
        inside = not limit or i * processes + accelerator.process_index < limit
        per_image[KEEP] = torch.full((n,), float(inside), device=batch["image"].device)
        gathered = accelerator.gather_for_metrics(per_image)  # drops the samples padded in for even shards
        keep = gathered.pop(KEEP)
        for key, value in gathered.items():
            sums[key] = sums.get(key, 0.0) + torch.where(keep > 0, value.float(), 0.0).sum()
        count += keep.sum().item()
    return {k: (v / max(count, 1)).item() for k, v in sums.items()}
