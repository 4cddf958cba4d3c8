"""Baseline students, built from the same parts so that comparisons with SAK are like for like.

`many_to_one`: one shared ViT; each teacher gets a projection head per level (LayerNorm + Linear to
the teacher's width) on the shared tokens, in the spirit of SAK's pilot study and RADIO / Theia (whose
heads are MLPs / small CNNs); task heads read
the shared tokens directly. With no teachers it is the plain multi-task baseline; with one teacher,
single-teacher distillation.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..teachers.base import normalize, to_float01
from .heads import DecodeHead
from .model import StudentOutput, TeacherSlot, _init_linear
from .stem import TeacherAgnosticStem, student_levels


class ManyToOneStudent(nn.Module):
    inference_uses_teacher_paths = False  # the projections serve distillation only
    has_adapter_paths = False  # so a recipe's teachers[].adapter would go unused (validate refuses it)

    def __init__(
        self, stem: TeacherAgnosticStem, teachers: list[TeacherSlot], tasks: dict[str, int], levels: list[int] | None
    ) -> None:
        super().__init__()
        self.stem = stem
        self.levels = student_levels(levels, stem.depth)
        stem.truncate(max(self.levels) + 1)
        d = stem.dim
        for slot in teachers:
            if len(slot.level_dims) != len(self.levels):
                raise ValueError(
                    f"teacher {slot.id!r} returns {len(slot.level_dims)} levels but the student has {len(self.levels)}"
                )
        self.projections = nn.ModuleDict(
            {
                s.id: nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, c)) for c in s.level_dims)
                for s in teachers
            }
        )
        self.projections.apply(_init_linear)
        self.heads = nn.ModuleDict({t: DecodeHead(d, len(self.levels), c) for t, c in tasks.items()})

    @classmethod
    def from_config(cls, stem: TeacherAgnosticStem, teachers: list[TeacherSlot], tasks: dict[str, int], cfg):
        return cls(stem, teachers, tasks, cfg.levels)

    def forward(self, images: Tensor, with_features: bool = True) -> StudentOutput:
        x = normalize(to_float01(images), self.stem.mean, self.stem.std)
        h, w = x.shape[-2:]
        _, outs, grid = self.stem.run(x)
        shared = [outs[i] for i in self.levels]
        result = StudentOutput()
        if with_features:
            for tid, heads in self.projections.items():
                result.features[tid] = [self.stem.to_map(p(t), grid) for p, t in zip(heads, shared, strict=True)]
        prefix = self.stem.num_prefix_tokens
        for task, head in self.heads.items():
            result.tasks[task] = head([t[:, prefix:] for t in shared], grid, (h, w))
        return result
