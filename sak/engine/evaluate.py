"""Held-out evaluation during and after training: per-teacher feature cosine, distillation and task
losses, averaged over every image of the split across all processes."""

from __future__ import annotations

import torch

from ..config import Recipe
from ..student import StudentOutput
from .step import compute_losses, feature_cosines, teacher_targets


@torch.no_grad()
def evaluate(
    accelerator, student, teachers, loader, tasks, distill_loss, recipe: Recipe, dtype, normalizers=None
) -> dict[str, float]:
    student.eval()
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for i, batch in enumerate(loader):
        if recipe.eval.batches and i >= recipe.eval.batches:
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
        gathered = accelerator.gather_for_metrics(per_image)  # drops the samples padded in for even shards
        for key, value in gathered.items():
            sums[key] = sums.get(key, 0.0) + value.float().sum()
        count += next(iter(gathered.values())).numel()
    return {k: (v / max(count, 1)).item() for k, v in sums.items()}
