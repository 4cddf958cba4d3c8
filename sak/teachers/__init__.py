"""Frozen teachers: `create_teacher(name, ...)` and `list_teachers()`, like `timm.create_model`."""

from __future__ import annotations

import dataclasses

from ..registry import TEACHERS, check_call
from . import clip, dinov2, efficientnet, hed, imgfocus, sam, timm_teacher  # noqa: F401  (register their teachers)
from .base import Teacher, TeacherMeta, TeacherOutput, TeacherSpec
from .weights import refuse_loader_kwargs


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
    refuse_loader_kwargs(options.get("model_kwargs"), f"teacher {name!r}: options.model_kwargs", "`weights`")
    spec = spec or TeacherSpec()
    if weights is not None:  # a copy: the caller's spec (a recipe's, reused for another teacher) stays as it was
        spec = dataclasses.replace(spec, weights=weights)
    built = build_options(cls, options, where=name)  # a key path, as in a recipe: 'dinov2.options.size'
    check_call(cls, (spec, built), f"teacher {name!r}", "(spec, options)")
    teacher = cls(spec, built)
    if not isinstance(getattr(teacher, "meta", None), TeacherMeta):  # (else: no attribute 'input_size', below)
        raise ValueError(
            f"teacher {name!r} ({cls.__name__}): its __init__ must set self.meta = TeacherMeta(...) (name, source, "
            f"embed_dim, patch_size, native_size, mean, std, levels; docs/adding-a-teacher.md), found "
            f"{type(getattr(teacher, 'meta', None)).__name__}"
        )
    if spec.levels is not None and tuple(teacher.meta.levels) != tuple(spec.levels):
        raise ValueError(
            f"teacher {name!r}: levels {list(spec.levels)} were asked for (teachers[].levels), but it gives "
            f"{list(teacher.meta.levels)}; a teacher must build its levels from spec.levels "
            "(sak.teachers.base.check_levels, docs/adding-a-teacher.md)"
        )
    if spec.resize == "keep" and teacher.meta.resize != "keep":  # (a plug-in that does not read spec.resize)
        raise ValueError(
            f"teacher {name!r}: resize 'keep' was asked for (teachers[].resize), but it gives its input its own "
            f"size ({teacher.meta.resize}); 'keep' is for dinov2 and clip from timm (source timm), and for a plug-in "
            "that takes it (takes_resize_keep) and sets meta.resize from spec.resize"
        )
    size, stride = teacher.input_size, teacher.meta.patch_size
    # Teacher.level_shapes promises maps of size / stride cells a side (the cache stores those shapes); a teacher
    # that works out its own shapes (EfficientNet's odd sizes) or crops its input to the grid ("keep") is exempt
    promises = type(teacher).level_shapes is Teacher.level_shapes and teacher.meta.resize != "keep"
    if promises and stride and size % stride:
        below, above = size - size % stride, size - size % stride + stride
        raise ValueError(
            f"teacher {name!r} ({teacher.meta.name}): image_size {size} is not a multiple of its patch size / "
            f"stride {stride}, so its maps cannot be {size} / {stride} cells a side; set the teacher's image_size "
            f"(teachers[].image_size) to {f'{below} or {above}' if below else above}"
        )
    if not teacher.meta.num_params:
        teacher.meta = dataclasses.replace(teacher.meta, num_params=sum(p.numel() for p in teacher.parameters()))
    return teacher.freeze()


def list_teachers() -> list[str]:
    return TEACHERS.names()


__all__ = ["Teacher", "TeacherMeta", "TeacherOutput", "TeacherSpec", "create_teacher", "list_teachers"]
