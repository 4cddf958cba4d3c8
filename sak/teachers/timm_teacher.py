"""Generic timm teacher: any timm model with `forward_intermediates` becomes a teacher by name.

    teachers:
      - name: timm
        options: {model: vit_base_patch14_dinov2.lvd142m}
        weights: hub              # or a local file, or omitted for random weights
      - name: timm
        options: {model: convnext_tiny.in12k}   # CNNs and other hierarchical models too

Levels are the indices of `forward_intermediates` (final norm not applied, as SAK), which are those of
timm's `feature_info`: one per block for a ViT, one per stage for a CNN or other hierarchical model (ResNets
and EfficientNets also list the stem, stride 2). Channels and stride of each level are read from
`feature_info`, so `level_dims` / `level_strides` / `level_shapes()` are those of the maps `forward` returns:
a hierarchical model is run once at its input size when built, and refused where they are not.
The default is four evenly spaced indices ending at the last one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import timm
import torch
from torch import Tensor, nn

from ..registry import TEACHERS
from .base import Teacher, TeacherMeta, TeacherOutput, TeacherSpec, check_levels, count_params, default_levels
from .weights import (
    WeightsError,
    build_error,
    check_timm_model,
    check_timm_tag,
    check_timm_tag_for_file,
    is_timm_file,
    load_state_dict,
    load_strict,
    local_path,
    refuse_sha256_without_file,
    verify_sha256,
)

__all__ = ["TimmTeacher", "default_levels", "feature_levels"]  # default_levels: its historical home


def feature_levels(model: nn.Module, what: str) -> list[tuple[int, int]]:
    """(channels, stride) of every output `forward_intermediates` can return, in index order.

    timm's `feature_info` has one entry per index of `forward_intermediates` (per block for a ViT, per stage
    for a CNN, whose channels and strides differ from stage to stage). A plain ViT from a timm that lacks
    `feature_info` is still understood: every block gives `embed_dim` channels at the patch stride.
    """
    info = getattr(model, "feature_info", None)
    if info:
        return [(int(f["num_chs"]), int(f["reduction"])) for f in info]
    blocks, patch_embed = getattr(model, "blocks", None), getattr(model, "patch_embed", None)
    if blocks is not None and patch_embed is not None and hasattr(model, "embed_dim"):
        return [(int(model.embed_dim), int(patch_embed.patch_size[0]))] * len(blocks)
    raise ValueError(
        f"{what}: {type(model).__name__} has neither timm's feature_info nor ViT blocks, so the channels and "
        "strides of its forward_intermediates outputs are unknown; write a teacher for it (docs/adding-a-teacher.md)"
    )


def classifier_keys(model: nn.Module, state: dict[str, Tensor]) -> set[str]:
    """Keys of the classifier that a full checkpoint holds and the headless model lacks: `head.*` for a ViT,
    `fc.*` for a ResNet, `classifier.*`, `head.fc.*` for a ConvNeXt (whose `head.norm` stays in the model)."""
    names = model.pretrained_cfg.get("classifier") or ()
    prefixes = tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))
    own = model.state_dict()
    return {k for k in state if k.startswith(prefixes) and k not in own} if prefixes else set()


@TEACHERS.register("timm")
class TimmTeacher(Teacher):
    @dataclass
    class Options:
        model: str = "vit_small_patch14_dinov2"
        model_kwargs: dict = field(default_factory=dict)  # e.g. {embed_dim: 64, depth: 4} for a tiny model

    def __init__(self, spec: TeacherSpec, options: Options) -> None:
        super().__init__(spec)
        what = f"timm teacher {options.model}"
        path = local_path(spec.weights, what) if is_timm_file(spec.weights) else None  # (before the model is built)
        refuse_sha256_without_file(spec.weights, spec.sha256, what)
        pretrained = spec.weights is not None and path is None
        if pretrained and spec.weights not in ("hub", "default"):
            model_name = f"{options.model.split('.')[0]}.{spec.weights}"  # a pretrained tag, e.g. lvd142m
        else:
            model_name = options.model
        kwargs = dict(options.model_kwargs)
        check_timm_model(model_name, f"{what}: options.model")
        if pretrained:
            check_timm_tag(model_name, what)
        elif spec.weights is not None:  # a local file: its mean / std come from the name's tag
            check_timm_tag_for_file(model_name, what)
        try:
            self.model = self._create(model_name, pretrained, kwargs, spec.image_size is not None)
        except (TypeError, AssertionError) as exc:  # a keyword the model does not take, or a value it refuses
            raise build_error(exc, kwargs, f"{what}: options") from exc
        except (RuntimeError, OSError) as exc:  # hub errors (offline, not cached) are OSErrors
            if not pretrained:  # not a download: an unknown tag or bad model_kwargs, which timm words clearly
                raise
            raise WeightsError(
                f"timm teacher: could not create {model_name!r} with pretrained weights from the hub "
                f"(looked in the Hugging Face cache, HF_HOME / ~/.cache/huggingface): {type(exc).__name__}: {exc}. "
                "Offline, pass a local file instead: `weights: /path/to/model.safetensors` (or .pth)."
            ) from exc
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(f"{what}: the model has no forward_intermediates(); it cannot be a teacher")
        available = feature_levels(self.model, what)
        digest = None
        if path is not None:
            digest = verify_sha256(path, spec.sha256, what)
            state = load_state_dict(path, what)
            dropped = classifier_keys(self.model, state)  # the teacher is built without its classifier
            load_strict(self.model, {k: v for k, v in state.items() if k not in dropped}, path, what)
        strides = [s for _, s in available]
        # a hierarchical model's default is its deepest four levels (strides 4 to 32 of dla34's or vgg11's six,
        # whose first are at strides 1 and 2); evenly spaced blocks (`default_levels`) are a ViT's
        deepest = tuple(range(max(len(available) - 4, 0), len(available))) if len(set(strides)) > 1 else None
        levels = check_levels(spec.levels, len(available), what, default=deepest, hint=f", strides {strides}")
        cfg = self.model.pretrained_cfg
        img_size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        native = int(img_size[0]) if img_size else int(cfg.get("input_size", (3, 224, 224))[-1])
        dims, level_strides = [available[i][0] for i in levels], [available[i][1] for i in levels]
        size = spec.image_size or native
        if len(set(strides)) > 1 and size % level_strides[-1]:
            # a CNN rounds odd sizes up or down layer by layer; at multiples of the stride every level is
            # exactly size / stride, which is what level_shapes() promises (and the feature cache stores)
            stride = level_strides[-1]
            below, above = size - size % stride, size - size % stride + stride
            raise ValueError(
                f"{what}: image_size must be a multiple of {stride} (the stride of level {levels[-1]}), got {size}; "
                f"set the teacher's image_size (teachers[].image_size) to {f'{below} or {above}' if below else above}"
            )
        self.meta = TeacherMeta(
            name=options.model,
            source="timm",
            architecture=type(self.model).__name__,
            embed_dim=dims[-1],
            patch_size=level_strides[-1],
            native_size=native,
            mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            levels=levels,
            resize="square",
            weights=spec.weights or "random",
            sha256=digest,
            num_params=count_params(self.model),
            extra={
                "level_dims": dims,
                "level_strides": level_strides,
                # the tag's eval resize where it is not bicubic (167 of timm's 1826 tags, e.g. resnet50.tv_in1k)
                **({"interpolation": cfg["interpolation"]} if cfg.get("interpolation", "bicubic") != "bicubic" else {}),
            },
        )
        if len(set(strides)) > 1:
            probe = self._probe(model_name, kwargs, spec.image_size is not None)
            self._check_level_shapes(what, size, native, probe)

    def _probe(self, name: str, kwargs: dict, other_size: bool) -> nn.Module | None:
        """The same architecture built on the meta device (shapes only, no memory, nothing computed), or None
        where the model cannot be built there."""
        try:
            with torch.device("meta"):
                return self._create(name, False, kwargs, other_size)
        except Exception:  # e.g. an __init__ that reads a tensor's value: the real model is probed instead
            return None

    def _check_level_shapes(self, what: str, size: int, native: int, probe: nn.Module | None = None) -> None:
        """One image through a hierarchical model (a CNN, a hybrid) at the input size: its maps must be
        size / stride each, as `level_shapes()` promises and the feature cache stores. Unpadded convolutions
        (the Inception family) give smaller maps, and models built for one input size (EfficientFormer, LeViT)
        fail at another; both are refused here rather than at the first batch or in the cache's reader.

        The image goes through `probe`, the model on the meta device, where output shapes are computed without
        the arithmetic (0.14 s instead of 8.3 s for convnext_large at 768 px on one CPU thread); where that
        fails, through the model itself, whose error (or success) decides."""

        def maps_of(model: nn.Module, device: str) -> list[Tensor]:
            with torch.no_grad():
                return model.eval().forward_intermediates(torch.zeros(1, 3, size, size, device=device),
                                                          indices=list(self.meta.levels), norm=False,
                                                          output_fmt="NCHW", intermediates_only=True)  # fmt: skip

        try:
            maps = maps_of(probe, "meta") if probe is not None else None
        except Exception:  # an operation without a meta kernel, or the model's own error: the real run says which
            maps = None
        try:
            if maps is None:
                maps = maps_of(self.model, "cpu")
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise ValueError(
                f"{what}: the model does not run at {size} px ({type(exc).__name__}: {str(exc)[:200]}); it may take "
                f"only the size it was built for ({native}): set teachers[].image_size to {native}, or build it for "
                f"{size} (model_kwargs: {{img_size: {size}}}, where the model takes it)"
            ) from exc
        got, want = [tuple(m.shape[1:]) for m in maps], [tuple(s) for s in self.level_shapes()]
        if got != want:
            raise ValueError(
                f"{what}: at {size} px its levels are {got}, not {want} (size / stride): its convolutions do not "
                "pad (the Inception family), so its maps do not follow the input size; it cannot be a teacher here"
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
        # a token model's image feature as the model pools it: its class token, or for one without (registers
        # and average pooling, `*_reg4_gap_*`) the pooled patches, not the first register token
        summary = self.model.forward_head(final, pre_logits=True) if final.ndim == 3 else None
        return TeacherOutput(levels=tuple(levels), summary=summary)
