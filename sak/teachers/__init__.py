"""Frozen teachers: `create_teacher(name, ...)` and `list_teachers()`, like `timm.create_model`."""

from __future__ import annotations

import dataclasses

from ..registry import TEACHERS
from . import clip, dinov2, efficientnet, hed, imgfocus, sam, timm_teacher  # noqa: F401  (register their teachers)
from .base import Teacher, TeacherMeta, TeacherOutput, TeacherSpec


def create_teacher(name: str, weights: str | None = None, *, spec: TeacherSpec | None = None, **options) -> Teacher:
    """Build a registered teacher, frozen and in eval mode.

    Args:
        name: registry name (`sak teachers list`).
        weights: hub tag, local file or directory; None = random weights.
        spec: the common options (levels, image_size, normalization, sha256); `weights` wins if given.
        **options: the teacher's own options (its `Options` dataclass); unknown keys are errors.
    """
    from ..config import build_options  # the recipe schema imports this package; import it late

    cls = TEACHERS.get(name)
    spec = spec or TeacherSpec()
    if weights is not None:  # a copy: the caller's spec (a recipe's, reused for another teacher) stays as it was
        spec = dataclasses.replace(spec, weights=weights)
    teacher = cls(spec, build_options(cls, options, where=f"teacher {name!r}"))
    if not teacher.meta.num_params:
        teacher.meta = dataclasses.replace(teacher.meta, num_params=sum(p.numel() for p in teacher.parameters()))
    return teacher.freeze()


def list_teachers() -> list[str]:
    return TEACHERS.names()


__all__ = ["Teacher", "TeacherMeta", "TeacherOutput", "TeacherSpec", "create_teacher", "list_teachers"]
