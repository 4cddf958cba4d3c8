"""The math of one step, shared by the training loop, evaluation and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..losses.distill import map_cosine
from ..student import StudentOutput
from ..tasks import Task
from ..teachers import Teacher, TeacherOutput


@dataclass
class StepLosses:
    total: Tensor
    distill: dict[str, Tensor] = field(default_factory=dict)  # per teacher
    tasks: dict[str, Tensor] = field(default_factory=dict)  # per task, unweighted

    def scalars_tensors(self) -> dict[str, Tensor]:
        """Every loss term as a 0-dim tensor, keyed as it is logged ("loss", "distill/<teacher>", ...)."""
        out = {"loss": self.total}
        out.update({f"distill/{k}": v for k, v in self.distill.items()})
        out.update({f"task/{k}": v for k, v in self.tasks.items()})
        return out


def begin_step(cuda_graphs: bool) -> None:
    """Where a step (a micro-batch, an evaluation batch) begins, for torch.compile's CUDA graphs
    (`precision.compile_mode` reduce-overhead or max-autotune): their outputs are overwritten when the graphs
    run again. Every output the loop keeps across steps is a copy (the teachers' maps, the stacked logged losses),
    so that no kept tensor refers to a graph's memory. A no-op without CUDA graphs."""
    if cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()


def teacher_targets(
    teachers: dict[str, Teacher], images: Tensor, dtype: torch.dtype | None
) -> dict[str, TeacherOutput]:
    """Every teacher's output for the batch, without autograd, as float32."""
    return {tid: teacher.encode(images, dtype) for tid, teacher in teachers.items()}


def compute_losses(
    out: StudentOutput,
    targets: dict[str, TeacherOutput],
    batch: dict,
    tasks: dict[str, Task],
    distill_loss: nn.Module,
    alpha: float,
) -> StepLosses:
    """total = sum_t w_t * task_t + alpha * sum_teachers distill (alpha = 1 in stage 1 without tasks)."""
    distill = {tid: distill_loss(out.features[tid], target.levels) for tid, target in targets.items()}
    task_losses = {name: task.loss(out.tasks[name], batch[name]) for name, task in tasks.items()}
    total = sum((tasks[name].weight * loss for name, loss in task_losses.items()), start=torch.zeros(()))
    if distill:
        total = total + alpha * sum(distill.values())
    return StepLosses(total=total, distill=distill, tasks=task_losses)


@torch.no_grad()
def feature_cosines(out: StudentOutput, targets: dict[str, TeacherOutput]) -> dict[str, Tensor]:
    """Held-out quality: per teacher, each image's flattened-map cosine averaged over levels, (B,)."""
    result = {}
    for tid, target in targets.items():
        cos = [map_cosine(s, t) for s, t in zip(out.features[tid], target.levels, strict=True)]
        result[tid] = torch.stack(cos).mean(0)
    return result
