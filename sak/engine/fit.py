"""Whether a dataset's samples (the training crop, the evaluation canvas) fit the student and the teachers:
checked before the first step, an export's prediction or an evaluation, not met in timm's words later."""

from __future__ import annotations

import torch

from ..config import RecipeError
from ..data import SakDataset


def check_canvas(model: torch.nn.Module, canvas: tuple[int, int], setting: str = "data.options.eval_size") -> None:
    """A ViT built for a fixed input size cannot take another canvas; `setting` is the key that gives it."""
    embed = getattr(getattr(getattr(model, "stem", None), "vit", None), "patch_embed", None)
    if embed is None:
        return
    patch = embed.patch_size[0]
    if canvas[0] % patch or canvas[1] % patch:
        raise RecipeError(f"{setting} {list(canvas)} is not a multiple of the student's patch size {patch}")
    if embed.strict_img_size and tuple(embed.img_size) != tuple(canvas):
        what = {"data.options.crop_size": "training crop", "data.image_size": "samples' size"}.get(
            setting, "evaluation canvas"
        )
        raise RecipeError(
            f"the student takes {embed.img_size[0]}x{embed.img_size[1]} inputs but the {what} is "
            f"{canvas[0]}x{canvas[1]}: set {setting} (or student.input_size, the size the student is built for), "
            "or build the student with student.model_kwargs.dynamic_img_size=true"
        )


def check_samples_fit(model: torch.nn.Module, dataset, teachers: dict | None = None) -> None:
    """The size of a dense dataset's samples (the training crop, or the evaluation canvas) fits the student
    and every teacher (`Teacher.check_image_size`): checked when training starts, not when the first step or
    the final evaluation fails in timm's words."""
    canvas = getattr(dataset, "eval_size", None)
    size, setting = None, "data.options.eval_size"
    if canvas is None:  # image folders, generated data: every sample is data.image_size square
        spec = getattr(dataset, "spec", None)
        side = getattr(spec, "image_size", None)
        if side is not None:  # (a student built for another size by student.input_size takes it only if dynamic)
            size, setting = (side, side), "data.image_size"
        # a plug-in's evaluation canvas, which its prediction_canvas gives (the first evaluation failed in timm's
        # words, after training up to it)
        if side is not None and not spec.train and isinstance(dataset, SakDataset):
            drawn = tuple(type(dataset).prediction_canvas(side, dataset.options)[0])
            if drawn != size:
                size, setting = drawn, f"data.options (the evaluation canvas of {type(dataset).__name__})"
    else:
        spec = getattr(dataset, "spec", None)
        if spec is not None and spec.train:
            crop = getattr(getattr(dataset, "augment", None), "crop_size", None)  # (a plug-in's may have none)
            if crop is not None:
                size, setting = tuple(crop), "data.options.crop_size"
        else:
            size = tuple(canvas)
    if size is not None:
        check_canvas(model, size, setting)
        for teacher in (teachers or {}).values():
            teacher.check_image_size(size)
