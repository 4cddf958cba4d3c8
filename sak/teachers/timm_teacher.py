"""Generic timm teacher: any timm model with `forward_intermediates` becomes a teacher by name.

    teachers:
      - name: timm
        options: {model: vit_base_patch14_dinov2.lvd142m}
        weights: hub              # or a local file, or omitted for random weights

Levels come from the model's blocks (`forward_intermediates(norm=False)`, final norm not
applied, as SAK); the default is four evenly spaced blocks ending at the last one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import timm
from torch import Tensor

from ..registry import TEACHERS
from .base import Teacher, TeacherMeta, TeacherOutput, TeacherSpec, count_params
from .weights import WeightsError, is_local, load_state_dict, local_path, verify_sha256


def default_levels(depth: int, count: int = 4) -> list[int]:
    """Evenly spaced block indices ending at the last block: 12 -> [2, 5, 8, 11], 24 -> [5, 11, 17, 23]."""
    count = min(count, depth)
    step = depth // count
    return [depth - 1 - step * (count - 1 - i) for i in range(count)]


@TEACHERS.register("timm")
class TimmTeacher(Teacher):
    @dataclass
    class Options:
        model: str = "vit_small_patch14_dinov2"
        model_kwargs: dict = field(default_factory=dict)  # e.g. {embed_dim: 64, depth: 4} for a tiny model

    def __init__(self, spec: TeacherSpec, options: Options) -> None:
        super().__init__(spec)
        pretrained = spec.weights is not None and not is_local(spec.weights)
        if pretrained and spec.weights not in ("hub", "default"):
            model_name = f"{options.model.split('.')[0]}.{spec.weights}"  # a pretrained tag, e.g. lvd142m
        else:
            model_name = options.model
        kwargs = dict(options.model_kwargs)
        try:
            self.model = self._create(model_name, pretrained, kwargs, spec.image_size is not None)
        except (RuntimeError, OSError) as exc:  # hub errors (offline, not cached) are OSErrors
            raise WeightsError(
                f"timm teacher: could not create {model_name!r} with pretrained weights from the hub "
                f"(looked in the Hugging Face cache, HF_HOME / ~/.cache/huggingface): {type(exc).__name__}: {exc}. "
                "Offline, pass a local file instead: `weights: /path/to/model.safetensors` (or .pth)."
            ) from exc
        digest = None
        if spec.weights is not None and is_local(spec.weights):
            path = local_path(spec.weights, f"timm teacher {options.model}")
            digest = verify_sha256(path, spec.sha256, f"timm teacher {options.model}")
            state = load_state_dict(path, f"timm teacher {options.model}")
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            self.model.load_state_dict(state, strict=True)
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(f"timm model {options.model!r} has no forward_intermediates(); it cannot be a teacher")
        depth = len(self.model.blocks) if hasattr(self.model, "blocks") else len(self.model.stages)
        levels = tuple(spec.levels if spec.levels is not None else default_levels(depth))
        cfg = self.model.pretrained_cfg
        img_size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        native = int(img_size[0]) if img_size else int(cfg.get("input_size", (3, 224, 224))[-1])
        patch = getattr(getattr(self.model, "patch_embed", None), "patch_size", (32,))[0]
        self.meta = TeacherMeta(
            name=options.model,
            source="timm",
            architecture=type(self.model).__name__,
            embed_dim=int(getattr(self.model, "embed_dim", self.model.num_features)),
            patch_size=int(patch),
            native_size=native,
            mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            levels=levels,
            resize="square",
            weights=spec.weights or "random",
            sha256=digest,
            num_params=count_params(self.model),
        )

    @staticmethod
    def _create(name: str, pretrained: bool, kwargs: dict, other_size: bool):
        """timm model; at a size other than its own, ViTs resample position embeddings at run time
        (`dynamic_img_size`), so that weights load unchanged and any input size works."""
        if other_size and "dynamic_img_size" not in kwargs:
            try:
                return timm.create_model(name, pretrained=pretrained, num_classes=0, dynamic_img_size=True, **kwargs)
            except TypeError:  # not a ViT: convolutional models take any size anyway
                pass
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)

    def forward(self, x: Tensor) -> TeacherOutput:
        final, levels = self.model.forward_intermediates(
            x, indices=list(self.meta.levels), norm=False, output_fmt="NCHW", stop_early=False
        )
        summary = final[:, 0] if final.ndim == 3 and getattr(self.model, "num_prefix_tokens", 0) > 0 else None
        return TeacherOutput(levels=tuple(levels), summary=summary)
