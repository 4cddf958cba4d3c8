"""Student-vs-teacher feature losses, summed over teachers and levels.

SAK (REFERENCE §1): resize the smaller of the two maps bilinearly to the larger; loss =
0.9 * cosine-embedding loss on the whole map flattened per image + 0.1 * SmoothL1; teacher features
are not normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import LOSSES
from .resize import resize_bilinear


def match_size(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Resize the smaller of two (B, C, h, w) maps bilinearly (align_corners=False) to the larger one's size.
    Computed as two matrix products (sak.losses.resize): the same linear map as F.interpolate, faster."""
    hs, ws = student.shape[-2:]
    ht, wt = teacher.shape[-2:]
    if (hs, ws) == (ht, wt):
        return student, teacher
    if hs * ws < ht * wt:
        student = resize_bilinear(student, (ht, wt))
    else:
        teacher = resize_bilinear(teacher, (hs, ws))
    return student, teacher


def flat_cosine(student: Tensor, teacher: Tensor, eps: float = 1e-8) -> Tensor:
    """(B,) cosine of each image's flattened maps: F.cosine_similarity(s.flatten(1), t.flatten(1), eps=eps)
    (norms clamped to eps each), written as dot / (|s| |t|). F.cosine_similarity first divides both inputs
    by their norms, which costs several full-size temporaries forward and backward; on a teacher's 64 x 64
    map that made it 2-2.5x slower than this forward + backward (benchmarks/results/distill_loss_cpu.md).
    The two differ only in float rounding (below 1e-6 relative in float32)."""
    s, t = student.flatten(1), teacher.flatten(1)
    dot = (s * t).sum(1)
    norms = torch.linalg.vector_norm(s, dim=1).clamp_min(eps) * torch.linalg.vector_norm(t, dim=1).clamp_min(eps)
    return dot / norms


class DistillLoss(nn.Module):
    """Base: `forward(student_levels, teacher_levels) -> scalar`, summing `level_loss` over levels."""

    def level_loss(self, student: Tensor, teacher: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, student: list[Tensor] | tuple[Tensor, ...], teacher: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
        if len(student) != len(teacher):
            raise ValueError(f"student gives {len(student)} levels, teacher {len(teacher)}; they must match")
        total = student[0].new_zeros(())
        for s, t in zip(student, teacher, strict=True):
            s, t = match_size(s.float(), t.float())
            total = total + self.level_loss(s, t)
        return total


@LOSSES.register("sak")
class SAKDistill(DistillLoss):
    """cos_weight * (1 - cos) on each image's flattened map + l1_weight * SmoothL1 (SAK: 0.9 / 0.1)."""

    def __init__(self, cos_weight: float = 0.9, l1_weight: float = 0.1, beta: float = 1.0) -> None:
        super().__init__()
        self.cos_weight, self.l1_weight, self.beta = cos_weight, l1_weight, beta

    def level_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        cos = flat_cosine(student, teacher)  # (B,)
        return self.cos_weight * (1 - cos).mean() + self.l1_weight * F.smooth_l1_loss(student, teacher, beta=self.beta)


@LOSSES.register("token_cosine")
class TokenCosineDistill(DistillLoss):
    """Per-token (per-pixel) cosine, as RADIO / UNIC, plus an optional SmoothL1 term."""

    def __init__(self, cos_weight: float = 0.5, l1_weight: float = 0.5, beta: float = 1.0) -> None:
        super().__init__()
        self.cos_weight, self.l1_weight, self.beta = cos_weight, l1_weight, beta

    def level_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        cos = F.cosine_similarity(student, teacher, dim=1)  # (B, h, w)
        loss = self.cos_weight * (1 - cos).mean()
        if self.l1_weight:
            loss = loss + self.l1_weight * F.smooth_l1_loss(student, teacher, beta=self.beta)
        return loss


@LOSSES.register("mse")
class MSEDistill(DistillLoss):
    def level_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        return F.mse_loss(student, teacher)


@torch.no_grad()
def map_cosine(student: Tensor, teacher: Tensor) -> Tensor:
    """(B,) cosine of each image's flattened student and teacher maps (the held-out quality number)."""
    s, t = match_size(student.float(), teacher.float())
    return flat_cosine(s, t)
