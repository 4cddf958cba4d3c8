"""The SAK student: TAS + one TSAP per teacher + aligners (distillation) + MoR routers and heads (tasks)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import ROUTERS
from ..teachers.base import normalize, to_float01
from .adapters import TeacherSpecificAdapterPath, TokenGrid
from .heads import DecodeHead
from .router import Router, mix_experts, mix_experts_per_image, mix_experts_per_token
from .stem import TeacherAgnosticStem, student_levels


@dataclass(frozen=True)
class TeacherSlot:
    """What the student needs to know about one teacher: its key and each level's channels."""

    id: str
    level_dims: tuple[int, ...]
    adapter: str = "bottleneck"


@dataclass
class StudentOutput:
    features: dict[str, list[Tensor]] = field(default_factory=dict)  # teacher id -> (B, C_t, h, w) per level
    tasks: dict[str, Tensor] = field(default_factory=dict)  # task -> logits (B, channels, H, W)


class SAKStudent(nn.Module):
    """Args:
    stem: the teacher-agnostic ViT.
    teachers: one slot per teacher (a TSAP each).
    tasks: task name -> head channels; empty in stage 1.
    levels: stem blocks read as the output levels (default: four evenly spaced).
    router: MoR router type; aligner: "auto" adds Linear(D -> C_t) only where widths differ.
    """

    def __init__(
        self,
        stem: TeacherAgnosticStem,
        teachers: list[TeacherSlot],
        tasks: dict[str, int],
        levels: list[int] | None = None,
        down_ratio: int = 4,
        router: str = "noisy",
        aligner: str = "auto",
    ) -> None:
        super().__init__()
        self.stem = stem
        d = stem.dim
        self.levels = student_levels(levels, stem.depth)
        stem.truncate(max(self.levels) + 1)
        for slot in teachers:
            if len(slot.level_dims) != len(self.levels):
                raise ValueError(
                    f"teacher {slot.id!r} returns {len(slot.level_dims)} levels but the student has {len(self.levels)} "
                    f"(student.levels={self.levels}); set teachers[].levels or student.levels so they match"
                )
        self.paths = nn.ModuleDict(
            {s.id: TeacherSpecificAdapterPath(d, stem.depth, self.levels, s.adapter, down_ratio) for s in teachers}
        )
        self.aligners = nn.ModuleDict(
            {
                s.id: nn.ModuleList(
                    nn.Linear(d, c) if (aligner == "always" or c != d) else nn.Identity() for c in s.level_dims
                )
                for s in teachers
            }
        )
        router_cls = ROUTERS.get(router)
        experts = len(teachers) + 1
        self.routers = nn.ModuleDict({t: nn.ModuleList(router_cls(d, experts) for _ in self.levels) for t in tasks})
        self.heads = nn.ModuleDict({t: DecodeHead(d, len(self.levels), c) for t, c in tasks.items()})
        for module in (self.aligners, self.routers):  # SAK's initialisation for the new linear layers
            module.apply(_init_linear)

    @classmethod
    def from_config(
        cls, stem: TeacherAgnosticStem, teachers: list[TeacherSlot], tasks: dict[str, int], cfg
    ) -> SAKStudent:
        """Build from the recipe's `student` section (a `StudentConfig`)."""
        return cls(stem, teachers, tasks, cfg.levels, cfg.down_ratio, cfg.router, cfg.aligner)

    def preprocess(self, images: Tensor, size: int | None = None) -> Tensor:
        x = to_float01(images)
        if size is not None and x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return normalize(x, self.stem.mean, self.stem.std)

    def forward(self, images: Tensor, with_features: bool = True) -> StudentOutput:
        """images: uint8 or float [0, 1] (B, 3, H, W), H and W multiples of the patch size."""
        x = self.preprocess(images)
        h, w = x.shape[-2:]
        embedded, outs, grid = self.stem.run(x)  # (B, prefix + h*w, D) tokens
        prefix = self.stem.num_prefix_tokens
        layout = TokenGrid(prefix, *grid)
        paths = {tid: path(embedded, outs, layout) for tid, path in self.paths.items()}
        result = StudentOutput()
        if with_features:
            for tid, levels in paths.items():
                result.features[tid] = [
                    self.stem.to_map(align(tok), grid) for align, tok in zip(self.aligners[tid], levels, strict=True)
                ]
        if self.heads:
            # per level, the TAS expert (raw block tokens, as SAK) and the path experts, without the prefix
            # tokens; sliced once for all tasks, so that backward pads each gradient back to the full token
            # count once rather than once per task
            tas = [outs[i][:, prefix:] for i in self.levels]
            experts = [[tas[j]] + [paths[tid][j][:, prefix:] for tid in self.paths] for j in range(len(tas))]
            mixed = self.mix(tas, experts)
            for task, head in self.heads.items():
                result.tasks[task] = head(mixed[task], grid, (h, w))
        return result

    def mix(self, tas: list[Tensor], experts: list[list[Tensor]]) -> dict[str, list[Tensor]]:
        """Every task's router mixture per level. The routers' weights come first, task by task (the noisy
        routers draw their noise in that order); then, per level, the tasks whose routers weight each image
        mix the level's experts together (`mix_experts_per_image`: one stack, one product), those weighting each
        token (the noisy routers in training) together too (`mix_experts_per_token`), the others alone."""
        mixed: dict[str, list[Tensor | None]] = {task: [None] * len(tas) for task in self.heads}
        weights: dict[tuple[str, int], Tensor | None] = {}
        for task in self.heads:
            for j, router in enumerate(self.routers[task]):
                if type(router).forward is Router.forward:
                    weights[task, j] = router.weights(tas[j])
                else:  # a plug-in router with its own mixing
                    mixed[task][j] = router(tas[j], experts[j])
        for j in range(len(tas)):
            for ndim, mix in ((2, mix_experts_per_image), (3, mix_experts_per_token)):
                alike = [t for t in self.heads if (t, j) in weights and getattr(weights[t, j], "ndim", 0) == ndim]
                if alike:
                    for task, m in zip(alike, mix(experts[j], [weights[t, j] for t in alike]), strict=True):
                        mixed[task][j] = m
            for task in self.heads:
                if mixed[task][j] is None:
                    mixed[task][j] = mix_experts(experts[j], weights[task, j])
        return mixed


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


def parameter_report(model: nn.Module) -> dict[str, int]:
    """Parameters per component, the total, and what the exported inference model keeps (no aligners
    or distillation-only projections)."""

    def n(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    report = {"tas": n(model.stem)}
    for tid, path in getattr(model, "paths", {}).items():
        report[f"tsap.{tid}"] = n(path)
    distill_only = 0
    for name in ("aligners", "projections", "routers", "heads"):
        if hasattr(model, name):
            report[name] = n(getattr(model, name))
            distill_only += report[name] if name in ("aligners", "projections") else 0
    report["total"] = n(model)
    report["inference"] = report["total"] - distill_only
    return report
