"""The math of one step, shared by the training loop, evaluation and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..losses.distill import centred, flat_cosine, match_size
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


class RunningStatistics:
    """The batch-norm running statistics of a model (the task heads'), kept at a step's start and put back when
    the step is skipped as non-finite: its forward ran in training mode and folded the batch's statistics in
    (an inf upstream makes the running mean inf and the variance NaN). The later steps' losses, on batch
    statistics, would be finite again, and every checkpoint and evaluation after would carry the damage. One
    copy of a few small tensors a step; nothing without batch norm (stage 1)."""

    def __init__(self, model: nn.Module) -> None:
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.buffers = [
            b for m in norms for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None
        ]
        self.kept = [b.clone() for b in self.buffers]

    def keep(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.kept, self.buffers)

    def restore(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.kept)


def teacher_targets(
    teachers: dict[str, Teacher], images: Tensor, dtype: torch.dtype | None
) -> dict[str, TeacherOutput]:
    """Every teacher's output for the batch, without autograd, as float32."""
    return {tid: teacher.encode(images, dtype) for tid, teacher in teachers.items()}


@torch.no_grad()
def nonfinite_cause(teachers: dict[str, Teacher], images: list[Tensor], dtype: torch.dtype | None, gather=None) -> str:
    """Where a skipped step's non-finite loss came from, looked for again in the images of each of its
    micro-batches and in the teachers' outputs for them (run again: only at a skip, so a step pays nothing for
    it); "" when neither has one (the student's own numbers, which the learning rate and clipping govern).
    `teachers`: those run online (a cache's maps were checked when it was built). `gather`: Accelerate's
    gather_object under a launch of several processes (every process skips the same step), whose first cause is
    named with its process."""
    cause = ""
    for k, batch in enumerate(images):
        which = f"the images of micro-batch {k + 1} of {len(images)}" if len(images) > 1 else "the batch's images"
        if batch.is_floating_point() and not torch.isfinite(batch).all():
            cause = f"; {which} hold a non-finite value (check the data)"
        for tid, teacher in teachers.items() if not cause else ():
            bad = [i for i, level in enumerate(teacher.encode(batch, dtype).levels) if not torch.isfinite(level).all()]
            if bad:
                cause = (f"; teacher {tid!r} level {bad[0]} gives a non-finite value for {which} (check the "
                         "teacher, its weights and precision.teachers)")  # fmt: skip
                break
        if cause:
            break
    if gather is None:
        return cause
    found = [(rank, c) for rank, c in enumerate(gather([cause])) if c]
    return f"{found[0][1]} (on process {found[0][0]})" if found else ""


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
def feature_cosines(out: StudentOutput, targets: dict[str, TeacherOutput]) -> dict[str, tuple[Tensor, Tensor]]:
    """Held-out quality: per teacher, each image's flattened-map cosine averaged over levels, (B,), and the same
    of the maps less their per-channel means over the image (the spatial cosine, `map_cosine`), the maps
    brought to one size once for both."""
    result = {}
    for tid, target in targets.items():
        plain, spatial = [], []
        for s, t in zip(out.features[tid], target.levels, strict=True):
            s, t = match_size(s.float(), t.float())
            plain.append(flat_cosine(s, t))
            spatial.append(flat_cosine(centred(s), centred(t)))
        result[tid] = (torch.stack(plain).mean(0), torch.stack(spatial).mean(0))
    return result
