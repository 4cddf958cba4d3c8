"""DINOv2 as a teacher, from timm, transformers or Meta's own checkpoints (with or without registers).

    teachers:
      - name: dinov2                      # what the official SAK code uses: timm, lvd142m weights
        options: {size: base}
        weights: hub                      # timm's vit_base_patch14_dinov2.lvd142m from the Hugging Face hub
      - name: dinov2
        options: {size: large, source: transformers}
        weights: facebook/dinov2-large    # a model id, a save_pretrained directory, or a model.safetensors file
      - name: dinov2
        options: {size: base, source: meta}
        weights: /ckpt/dinov2_vitb14_pretrain.pth   # or `hub`: Meta's URL, cached where torch.hub keeps it

`source` defaults to what `weights` is: a directory with config.json or a file with transformers' key names
-> transformers; a file with Meta's (`mask_token`, `register_tokens`, `mlp.w12`) -> meta; a model id
(`org/name`) -> transformers; anything else -> timm.

Each source runs its own library's model, so a user gets the behaviour of the library they load through:
timm -> timm's VisionTransformer; transformers -> `Dinov2Model` / `Dinov2WithRegistersModel`; meta -> Meta's keys
converted by timm's own `checkpoint_filter_fn` into timm's VisionTransformer (Meta's code is not a package).
At the native 518 px (37 x 37 tokens) the three give the same features for the same weights. At any other
size they differ in how the position embeddings are resized, and each keeps its library's rule:
timm resamples once at load (bicubic, antialiased); transformers at every forward (bicubic, no antialias for
DINOv2, antialiased for the register models); Meta at every forward (bicubic, no antialias, scale factor
(n + 0.1) / 37 for DINOv2; antialiased, to size, for the register models). For the meta source that rule is
applied once at load, which is exact because a teacher runs at one input size.

Levels: patch tokens of four evenly spaced blocks ending at the last ([2, 5, 8, 11] for S/B, [5, 11, 17, 23]
for L, [9, 19, 29, 39] for g), final norm not applied, class and register tokens dropped, as (B, C, h, w).
Summary: the class token after the final norm (Meta's `x_norm_clstoken`, transformers' `pooler_output`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..registry import TEACHERS
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    KEEP_RESAMPLING,
    Teacher,
    TeacherMeta,
    TeacherOutput,
    TeacherSpec,
    check_levels,
    count_params,
    normalize,
    resize_images,
    to_float01,
)
from .dinov2_hf import build_transformers
from .dinov2_weights import (
    HUB_TAGS,
    NATIVE,
    Built,
    Source,
    Weights,
    choose_registers,
    infer_source,
    read_weights,
    variant_names,
)
from .weights import (
    WeightsError,
    build_error,
    first_misfit,
    load_state_dict,
    load_strict,
    probe_build,
    refuse_other_patch_kernel,
    verify_sha256,
)

META_URL = "https://dl.fbaipublicfiles.com/dinov2"
PATCH_HINT = "DINOv2's ViTs have patch 14 (a ViT of another patch size trained with DINOv2, UNI's ViT-L/16 say, is the `timm` teacher's)"


class TimmBackbone(nn.Module):
    """timm's VisionTransformer through `forward_intermediates` (prefix tokens dropped by timm)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.levels: tuple[int, ...] = ()
        self.depth = len(model.blocks)
        self.width = int(model.embed_dim)
        self.patch_size = int(model.patch_embed.patch_size[0])

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        final, maps = self.model.forward_intermediates(x, indices=list(self.levels), norm=False, output_fmt="NCHW")
        return maps, final[:, 0]  # final: (B, 1 + R + h*w, C) after the final norm


def create_timm(name: str, kwargs: dict, size: int, tag: str | None, what: str, any_size: bool = False) -> nn.Module:
    """timm's model at input `size`; with a tag, its hub weights, resampled by timm at load if needed.
    `any_size`: it takes other sizes too, its position embeddings resampled to the grid on each forward."""
    args = {"num_classes": 0, **kwargs, "img_size": size, **({"dynamic_img_size": True} if any_size else {})}
    full = f"{name}.{'lvd142m' if tag in ('hub', 'default') else tag}" if tag else name
    try:
        return timm.create_model(full, pretrained=tag is not None, **args)
    except TypeError as exc:
        raise ValueError(f"{what}: timm's {name} does not take model_kwargs {kwargs}: {exc}") from exc
    except AssertionError as exc:  # timm's checks of the shape (embed_dim not divisible by num_heads)
        raise build_error(exc, kwargs, what) from exc
    except RuntimeError as exc:
        if tag is None:  # nothing was downloaded: the model_kwargs build no model (a negative size)
            raise build_error(exc, kwargs, what) from exc
        if "loading state_dict" not in str(exc):
            probe_build(lambda: timm.create_model(full, pretrained=False, **args), kwargs, what)
            raise _hub_error(full, what, exc) from exc
        # found and read: the weights of another model than size / model_kwargs build
        raise WeightsError(
            f"{what}: the hub weights {full!r} do not fit the model built ({first_misfit(exc)}); check `size` / "
            f"`model_kwargs` (model_kwargs {kwargs})"
        ) from exc
    except OSError as exc:  # offline / not cached: huggingface_hub errors are OSErrors
        if tag is None:
            raise
        raise _hub_error(full, what, exc) from exc


def _hub_error(full: str, what: str, exc: Exception) -> WeightsError:
    from huggingface_hub import constants

    repo = f"timm/{full}"
    return WeightsError(
        f"{what}: could not load {full!r} from the Hugging Face hub (repo {repo}; looked in the Hugging Face "
        f"cache {constants.HF_HUB_CACHE}, HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}): "
        f"{type(exc).__name__}: {str(exc).rstrip('.')}. Offline, pass a local file instead: download "
        f"https://huggingface.co/{repo}/resolve/main/model.safetensors, or Meta's .pth, and set "
        "`weights: /path/to/model.safetensors`."
    )


def build_timm(size_name: str, registers: bool | None, kwargs: dict, spec: TeacherSpec, w: Weights, what: str) -> Built:
    if w.kind == "tag" and "/" not in w.value and w.value not in HUB_TAGS:  # (a misspelt tag is no model id)
        raise WeightsError(
            f"{what}: {w.value!r} is not a weights tag of DINOv2 (tags: {', '.join(HUB_TAGS)}), a transformers "
            "model id (org/name) or a local file"
        )
    if w.kind == "dir" or w.layout == "transformers" or (w.kind == "tag" and w.value not in HUB_TAGS):
        raise WeightsError(
            f"{what}: source timm reads timm's or Meta's checkpoints and the tags {list(HUB_TAGS)}; "
            f"{w.value!r} is for transformers (`source: transformers`)"
        )
    reg = choose_registers(registers, w.registers, repr(w.value), what)
    name = variant_names(size_name, reg)["timm"]
    native = int(kwargs.get("img_size", NATIVE))
    tag = w.value if w.kind == "tag" else None
    net = create_timm(name, kwargs, spec.image_size or native, tag, what, spec.resize == "keep")
    if w.kind == "file":
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = flatten_block_chunks(w.state) if w.layout == "meta" else dict(w.state)
        refuse_other_patch_kernel(state, net, w.path, what, PATCH_HINT)
        if w.layout == "meta":  # timm's converter recognises Meta's layout by its (unused) mask token
            state.setdefault("mask_token", torch.zeros(1, net.embed_dim))
        state = checkpoint_filter_fn(state, net)  # converts Meta's keys too; resamples pos_embed (antialiased)
        load_strict(net, {k: v for k, v in state.items() if not k.startswith("head.")}, w.path, what)
    rule = "bicubic, antialiased, resampled once at load (timm's checkpoint_filter_fn)"
    if spec.resize == "keep":
        rule = KEEP_RESAMPLING
    return Built(TimmBackbone(net), name, native, w.value or "random", w.digest, reg, rule)


def meta_hub_file(meta_name: str, what: str) -> Path:
    """Meta's checkpoint where `torch.hub.load('facebookresearch/dinov2', ...)` caches it; downloaded if missing
    unless the Hugging Face hub is set offline (HF_HUB_OFFLINE), the one offline switch the other sources obey."""
    from huggingface_hub import constants

    filename = f"{meta_name}_pretrain.pth"
    url = f"{META_URL}/{meta_name.removesuffix('_reg4')}/{filename}"
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if path.is_file():
        return path
    todo = f"download {url} and pass its path as `weights` (or put it at {path})"
    if constants.HF_HUB_OFFLINE:
        raise WeightsError(
            f"{what}: Meta's checkpoint is not in the torch.hub cache ({path}) and HF_HUB_OFFLINE=1; {todo}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # straight to `path`: torch writes a file of its own (a random name) and renames it into place when whole.
        # Through a fixed ".partial" name, the processes of a launch downloading at once wrote one file and the
        # second to rename it found it gone (FileNotFoundError)
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except OSError as exc:  # URLError / HTTPError / no disk space
        raise WeightsError(f"{what}: could not download {url} to {path}: {exc}. Offline, {todo}") from exc
    return path


def flatten_block_chunks(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Meta's FSDP layout (`blocks.<chunk>.<i>.`, i global) -> `blocks.<i>.`, as the released files are."""
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}


def resample_meta_pos_embed(pos_embed: Tensor, grid: tuple[int, int], registers: bool) -> Tensor:
    """Meta's `interpolate_pos_encoding` with its hub settings, applied once: (1, 1 + M*M, C) -> (1, 1 + h*w, C).

    DINOv2: bicubic without antialias, the scale factor (n + 0.1) / M (not the size) setting the sampling grid;
    register models: bicubic with antialias, to the size. Hand-written because no installed library has
    Meta's offset rule (timm and transformers resample to the size).
    """
    side = math.isqrt(pos_embed.shape[1] - 1)
    if (side, side) == tuple(grid):
        return pos_embed
    patch = rearrange(pos_embed[:, 1:].float(), "b (h w) c -> b c h w", h=side, w=side)
    if registers:
        patch = F.interpolate(patch, size=tuple(grid), mode="bicubic", antialias=True)
    else:
        scale = ((grid[0] + 0.1) / side, (grid[1] + 0.1) / side)
        patch = F.interpolate(patch, scale_factor=scale, mode="bicubic", antialias=False)
    patch = rearrange(patch, "b c h w -> b (h w) c").to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], patch], dim=1)


def build_meta(size_name: str, registers: bool | None, kwargs: dict, spec: TeacherSpec, w: Weights, what: str) -> Built:
    if w.kind == "tag" and w.value not in HUB_TAGS:
        raise WeightsError(f"{what}: source meta takes a local .pth or one of {list(HUB_TAGS)}, not {w.value!r}")
    if w.kind == "tag":
        path = meta_hub_file(variant_names(size_name, bool(registers))["meta"], what)
        digest = verify_sha256(path, spec.sha256, what)
        w = Weights("file", w.value, path, load_state_dict(path, what), "meta", digest)
    if w.kind == "dir" or w.layout not in (None, "meta"):
        raise WeightsError(
            f"{what}: {w.value!r} does not have Meta's layout (no mask_token / register_tokens); "
            f"use `source: {w.layout or 'transformers'}`"
        )
    reg = choose_registers(registers, w.registers, repr(w.value), what)
    names = variant_names(size_name, reg)
    native = int(kwargs.get("img_size", NATIVE))
    net = create_timm(names["timm"], kwargs, spec.image_size or native, None, what)
    if w.kind == "file":
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = flatten_block_chunks(w.state)
        refuse_other_patch_kernel(state, net, w.path, what, PATCH_HINT)
        state.setdefault("mask_token", torch.zeros(1, net.embed_dim))  # timm's converter recognises Meta by it
        if "pos_embed" in state:
            state["pos_embed"] = resample_meta_pos_embed(state["pos_embed"], net.patch_embed.grid_size, reg)
        load_strict(net, checkpoint_filter_fn(state, net), w.path, what)  # Meta keys -> timm keys
    rule = "Meta's: bicubic, " + ("antialiased, to size" if reg else "no antialias, scale (n + 0.1) / M")
    return Built(TimmBackbone(net), names["meta"], native, w.value or "random", w.digest, reg, rule + ", once at load")


BUILDERS = {"timm": build_timm, "transformers": build_transformers, "meta": build_meta}


@TEACHERS.register("dinov2")
class DINOv2Teacher(Teacher):
    """DINOv2 ViT-S/B/L/g with patch 14; see the module docstring for sources, levels and sizes."""

    takes_resize_keep = True  # with source timm

    @dataclass
    class Options:
        size: Literal["small", "base", "large", "giant"] = "base"
        source: Source | None = None  # None: from `weights` (config.json / key names / model id), else timm
        registers: bool | None = None  # the with-registers (reg4) variants; None: from the weights, else False
        model_kwargs: dict = field(default_factory=dict)  # timm create_model / Dinov2Config overrides (tiny tests)

    def __init__(self, spec: TeacherSpec, options: Options) -> None:
        super().__init__(spec)
        weights = read_weights(spec, f"dinov2 teacher ({options.size})")
        source = options.source or infer_source(weights)
        own_config = weights.kind == "dir" or weights.kind == "tag" and "/" in weights.value  # size plays no part
        what = f"dinov2 teacher ({source})" if own_config else f"dinov2 teacher ({source}, size {options.size})"
        if spec.resize == "keep" and source != "timm":  # (the others resample with their library's rule, once)
            raise ValueError(
                f"{what}: resize 'keep' is for source timm, whose model takes any size, its position embeddings "
                "resampled by timm's rule (what the official SAK code uses); timm reads Meta's .pth files too"
            )
        build = BUILDERS[source]
        built = build(options.size, options.registers, dict(options.model_kwargs), spec, weights, what)
        self.backbone = built.backbone
        patch = self.backbone.patch_size
        if (spec.image_size or built.native_size) % patch:
            raise ValueError(f"{what}: image_size must be a multiple of the patch size {patch} (e.g. 224, 448, 518)")
        self.backbone.levels = check_levels(spec.levels, self.backbone.depth, what)
        self.meta = TeacherMeta(
            name=built.name,
            source=source,
            architecture=f"{type(self.backbone.model).__module__.split('.')[0]}.{type(self.backbone.model).__name__}",
            embed_dim=self.backbone.width,
            patch_size=patch,
            native_size=built.native_size,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            levels=self.backbone.levels,
            resize="keep" if spec.resize == "keep" else "square",
            weights=built.weights,
            sha256=built.digest,
            num_params=count_params(self.backbone),
            extra={"registers": built.registers, "pos_embed_resampling": built.resampling},
        )

    def preprocess(self, images: Tensor) -> Tensor:
        """Loader batch (uint8 or float [0, 1], any size) -> (B, 3, S, S), ImageNet-normalised.

        The whole image is resized to S x S (bicubic, antialiased), so the teacher sees every pixel the student
        and the task targets see; the libraries' eval transforms resize the shortest side and centre-crop, which
        coincides on square images. Clamped to [0, 1] after resampling, as PIL's 8-bit bicubic saturates.
        With resize "keep": (B, 3, H', W'), the image cut to a multiple of 14 (the official SAK code's input).
        """
        x, _ = resize_images(to_float01(images), self.input_size, self.meta.resize, self.meta.patch_size)
        x = x.clamp(0.0, 1.0)
        if self.spec.normalization == "imagenet":
            return normalize(x, IMAGENET_MEAN, IMAGENET_STD)
        return normalize(x, self.meta.mean, self.meta.std)

    def forward(self, x: Tensor) -> TeacherOutput:
        """(B, 3, S, S) preprocessed images -> levels (B, C, S/14, S/14) and the class token (B, C)."""
        levels, summary = self.backbone(x)
        return TeacherOutput(levels=tuple(levels), summary=summary)


__all__ = ["DINOv2Teacher", "resample_meta_pos_embed", "variant_names"]
