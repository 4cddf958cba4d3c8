"""Student-vs-teacher feature losses, summed over teachers and levels.

SAK (ICLR 2025): resize the smaller of the two maps bilinearly to the larger; loss =
0.9 * cosine-embedding loss on the whole map flattened per image + 0.1 * SmoothL1; teacher features
are not normalised.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import LOSSES
from .resize import gram_matrix, resize_bilinear, resize_bilinear_adjoint


def match_size(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Resize the smaller of two (B, C, h, w) maps bilinearly (align_corners=False) to the larger one's size.
    Computed as two matrix products (sak.losses.resize): the same linear map as F.interpolate, faster.
    "Smaller" is by pixels. The official loss (innovator-zero/SAK, losses.py) compares heights only, resizing
    the teacher to the student unless the teacher's map is taller: the same choice whenever the taller map
    is also the larger (every shipped recipe's grids), the other for maps of one height and two widths (it
    shrinks the wider teacher) or a taller map of fewer pixels."""
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


def upsampled_cosine(student: Tensor, teacher: Tensor, eps: float = 1e-8) -> Tensor:
    """(B,) flat_cosine(resize_bilinear(student, teacher's size), teacher), without the resized map.

    With u = A s B^T the upsampled student (A, B the 1-D interpolation matrices), <u, t> = <s, A^T t B> and
    |u|^2 = <s, (A^T A) s (B^T B)>: both are taken at the student's size, and the gradient stays there too.
    Going through u instead reads and writes full-size maps three more times forward (u * t, its sum, |u|)
    and backward (two products and their sum), each 7x the student's map at SAM's 64 x 64 grid from the
    student's 24 x 24. Same function; the float32 sums are taken in another order."""
    (h, w), (H, W) = student.shape[-2:], teacher.shape[-2:]
    with torch.autocast(student.device.type, enabled=False):
        t_adjoint = resize_bilinear_adjoint(teacher, (h, w))  # no gradient: the teacher is a target
        gram_h, gram_w = (gram_matrix(n, m, student.device, student.dtype) for n, m in ((h, H), (w, W)))
        s = student.flatten(1)
        dot = (s * t_adjoint.flatten(1)).sum(1)
        squared = (s * (gram_h @ student @ gram_w).flatten(1)).sum(1)
    # sqrt(max(|u|^2, eps^2)) = max(|u|, eps) without an infinite derivative of sqrt at 0
    norms = squared.clamp_min(eps * eps).sqrt() * torch.linalg.vector_norm(teacher.flatten(1), dim=1).clamp_min(eps)
    return dot / norms


# upsampled_cosine's small-map products cost about as much as a few full-size passes: it pays off when the
# teacher's grid has several times the student's pixels. From the ViT-B student's 24 x 24 it moves fewer bytes
# from a 36 x 36 grid on (2.25x the pixels) and takes less CPU time from 48 x 48 on (4x); at SAM's 64 x 64 it
# moves 44% fewer bytes (benchmarks/results/distill_loss_cpu.md, second table).
UPSAMPLED_COSINE_MIN_RATIO = 4


class DistillLoss(nn.Module):
    """Base: `forward(student_levels, teacher_levels) -> scalar`, summing `pair_loss` over levels. A plug-in
    loss defines `level_loss` on two maps of one size (the smaller resized to the larger, as SAK), or
    `pair_loss` on the maps as they come."""

    def level_loss(self, student: Tensor, teacher: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def pair_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        """One level's loss, maps (B, C, h, w) and (B, C, H, W) at their own sizes."""
        return self.level_loss(*match_size(student, teacher))

    def forward(self, student: list[Tensor] | tuple[Tensor, ...], teacher: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
        if len(student) != len(teacher):
            raise ValueError(f"student gives {len(student)} levels, teacher {len(teacher)}; they must match")
        total = student[0].new_zeros(())
        for s, t in zip(student, teacher, strict=True):
            total = total + self.pair_loss(s.float(), t.float())
        return total


def check_weights(**values: float) -> None:
    """The loss's options (`loss.options`): finite, the weights zero or more, SmoothL1's beta above zero."""
    for key, value in values.items():
        low_ok = value > 0 if key == "beta" else value >= 0
        if not (math.isfinite(value) and low_ok):
            what = "positive" if key == "beta" else "zero or more"
            raise ValueError(f"loss.options.{key}: must be a finite number, {what}, got {value}")


@LOSSES.register("sak")
class SAKDistill(DistillLoss):
    """cos_weight * (1 - cos) on each image's flattened map + l1_weight * SmoothL1 (SAK: 0.9 / 0.1)."""

    def __init__(self, cos_weight: float = 0.9, l1_weight: float = 0.1, beta: float = 1.0) -> None:
        super().__init__()
        check_weights(cos_weight=cos_weight, l1_weight=l1_weight, beta=beta)
        self.cos_weight, self.l1_weight, self.beta = cos_weight, l1_weight, beta

    def level_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        cos = flat_cosine(student, teacher)  # (B,)
        return self.cos_weight * (1 - cos).mean() + self.l1_weight * F.smooth_l1_loss(student, teacher, beta=self.beta)

    def pair_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        (hs, ws), (ht, wt) = student.shape[-2:], teacher.shape[-2:]
        if ht * wt < UPSAMPLED_COSINE_MIN_RATIO * hs * ws:  # same size, the teacher resized, or close sizes
            return super().pair_loss(student, teacher)
        return self.upsampled_loss(student, teacher)

    def upsampled_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        """level_loss(resize_bilinear(student, teacher's size), teacher), the cosine taken without the upsampled
        map (upsampled_cosine): only the smooth L1 needs it."""
        ht, wt = teacher.shape[-2:]
        student = student.contiguous()  # one copy of the student map (a view of the token grid) for all products
        loss = self.cos_weight * (1 - upsampled_cosine(student, teacher)).mean()
        if self.l1_weight:
            loss = loss + self.l1_weight * F.smooth_l1_loss(resize_bilinear(student, (ht, wt)), teacher, beta=self.beta)
        return loss


@LOSSES.register("token_cosine")
class TokenCosineDistill(DistillLoss):
    """Per-token (per-pixel) cosine, as RADIO / UNIC, plus an optional SmoothL1 term."""

    def __init__(self, cos_weight: float = 0.5, l1_weight: float = 0.5, beta: float = 1.0) -> None:
        super().__init__()
        check_weights(cos_weight=cos_weight, l1_weight=l1_weight, beta=beta)
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
def map_cosine(student: Tensor, teacher: Tensor, spatial: bool = False) -> Tensor:
    """(B,) cosine of each image's flattened student and teacher maps (the held-out quality number). `spatial`:
    each map's per-channel mean over the image taken away first, so that only the spatial structure counts: the
    plain cosine of features with a large common mean vector is high for a student that predicts the mean alone."""
    s, t = match_size(student.float(), teacher.float())
    return flat_cosine(centred(s), centred(t)) if spatial else flat_cosine(s, t)


def centred(x: Tensor) -> Tensor:
    """(B, C, h, w) maps less each one's per-channel mean over the image (the spatial cosine's)."""
    return x - x.mean((2, 3), keepdim=True)
