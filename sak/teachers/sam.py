"""SAM's image encoder as a teacher, from segment_anything or timm (prompt encoder and mask decoder unused).

    teachers:
      - name: sam
        options: {source: segment_anything}      # size (b / l / h) read from the checkpoint
        weights: /ckpt/sam_vit_b_01ec64.pth       # Meta's file: the whole Sam; only image_encoder.* is read
      - name: sam                                 # what the official SAK code uses
        options: {source: timm, size: b}
        weights: sa1b                             # timm's hub copy (samvit_base_patch16.sa1b), or a local file

Both sources read Meta's checkpoints and timm's (`model.safetensors`) and give the same features. Input:
longest side resized to 1024 and zero-padded to 1024 x 1024 after normalisation with SAM's pixel mean / std
(`meta.resize = "longest_pad"`), a 64 x 64 token grid. Levels: outputs of four evenly spaced blocks ending at
the last (ViT-B [2, 5, 8, 11], L [5, 11, 17, 23], H [7, 15, 23, 31]: SAM's global-attention blocks), before
the neck, as (B, C, h, w). Summary: none.

Other input sizes (`image_size: 512`): both libraries interpolate the global blocks' relative-position tables
(linear) at run time; timm also resamples the absolute position embedding at every forward (bicubic,
antialiased), while segment_anything adds it as it is, so the teacher resamples that one once, at load time,
with timm's function: both sources still agree.

LayerNorm: SAM was trained with eps 1e-6; timm's samvit builds eps 1e-5 unless told, which moves block outputs
of the real weights by up to ~7e-5. The timm source builds it with `timm_layer_norm_eps` (default 1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import timm
from einops import rearrange
from timm.layers import resample_abs_pos_embed_nhwc
from torch import Tensor, nn

from ..registry import TEACHERS
from .base import Teacher, TeacherMeta, TeacherOutput, TeacherSpec, check_levels, count_params
from .sam_attention import fuse_sam_attention
from .weights import (
    WeightsError,
    build_error,
    check_timm_tag,
    is_local,
    load_state_dict,
    load_strict,
    local_path,
    probe_build,
    refuse_sha256_without_file,
    verify_sha256,
)

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
SAM_MEAN = tuple(m / 255 for m in SAM_PIXEL_MEAN)
SAM_STD = tuple(s / 255 for s in SAM_PIXEL_STD)
SIZES = {  # segment_anything's build_sam_vit_{b,l,h}
    "b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
}
# the other image-encoder arguments of segment_anything's _build_sam, for encoders built from model_kwargs
ENCODER_ARGS = {
    "img_size": 1024,
    "patch_size": 16,
    "mlp_ratio": 4,
    "qkv_bias": True,
    "use_rel_pos": True,
    "window_size": 14,
    "out_chans": 256,
}
TIMM_NAMES = {"b": "samvit_base_patch16", "l": "samvit_large_patch16", "h": "samvit_huge_patch16"}
META_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
META_FILES = {"b": "sam_vit_b_01ec64.pth", "l": "sam_vit_l_0b3195.pth", "h": "sam_vit_h_4b8939.pth"}


def encoder_state(path: Path, what: str) -> dict[str, Tensor]:
    """The image encoder's tensors of a Sam checkpoint, a bare encoder, or timm's samvit, in
    segment_anything's names."""
    state = load_state_dict(path, what)
    encoder = {k.removeprefix("image_encoder."): v for k, v in state.items() if k.startswith("image_encoder.")}
    if not encoder and "patch_embed.proj.weight" in state:
        encoder = {k.replace(".mlp.fc", ".mlp.lin"): v for k, v in state.items()}  # timm names its MLP fc1 / fc2
    if not encoder:
        raise WeightsError(
            f"{what}: {str(path)!r} holds neither image_encoder.* keys (a SAM checkpoint) nor an "
            f"image encoder (patch_embed.proj.weight); its keys start {sorted(state)[:4]}"
        )
    return encoder


def size_of(state: dict[str, Tensor], path: Path, what: str) -> str:
    if "patch_embed.proj.weight" not in state:  # SAM 2 (image_encoder.trunk.*), MobileSAM: other encoders
        raise WeightsError(
            f"{what}: {str(path)!r} holds an image encoder without SAM ViT's patch embedding (its keys start "
            f"{sorted(state)[:4]}); only SAM's ViT-B / L / H image encoders are supported (not SAM 2 or MobileSAM)"
        )
    dim = state["patch_embed.proj.weight"].shape[0]
    sizes = [size for size, cfg in SIZES.items() if cfg["embed_dim"] == dim]
    if not sizes:
        raise WeightsError(
            f"{what}: {str(path)!r} has width {dim}, not SAM's b / l / h (768 / 1024 / 1280); "
            "describe the encoder with `model_kwargs`"
        )
    return sizes[0]


def resize_encoder(encoder: nn.Module, image_size: int) -> None:
    """Fit a segment_anything encoder to another input size. It adds its position embedding as it is, so that
    is resampled here, once, exactly as timm does at every forward (bicubic, antialiased). Relative-position
    tables need nothing: both libraries' get_rel_pos interpolate them (linear) at run time."""
    grid = image_size // encoder.patch_embed.proj.kernel_size[0]
    if encoder.pos_embed is not None and encoder.pos_embed.shape[1] != grid:
        encoder.pos_embed = nn.Parameter(resample_abs_pos_embed_nhwc(encoder.pos_embed.data, [grid, grid]))
    encoder.img_size = image_size


class SegmentAnythingTower(nn.Module):
    """segment_anything's `ImageEncoderViT`, run block by block up to the last requested level."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.levels: tuple[int, ...] = ()
        self.patch_size = int(encoder.patch_embed.proj.kernel_size[0])
        self.depth = len(encoder.blocks)
        self.width = int(encoder.patch_embed.proj.out_channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.encoder.patch_embed(x)  # (B, h, w, C)
        if self.encoder.pos_embed is not None:
            if x.shape[1:3] != self.encoder.pos_embed.shape[1:3]:
                raise ValueError(
                    f"sam teacher (segment_anything) was built for {self.encoder.img_size} px input, got "
                    f"{x.shape[1] * self.patch_size} px; use teacher.preprocess or set image_size"
                )
            x = x + self.encoder.pos_embed
        maps = []
        for i, block in enumerate(self.encoder.blocks[: max(self.levels) + 1]):
            x = block(x)
            if i in self.levels:
                maps.append(rearrange(x, "b h w c -> b c h w"))
        return maps


class TimmSamTower(nn.Module):
    """timm's `VisionTransformerSAM` through its `forward_intermediates` (any input size)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.levels: tuple[int, ...] = ()
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.depth = len(model.blocks)
        self.width = int(model.embed_dim)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(
            x, indices=list(self.levels), norm=False, stop_early=True, intermediates_only=True
        )


def build_segment_anything(
    size: str, state: dict | None, spec: TeacherSpec, options: SamTeacher.Options
) -> tuple[nn.Module, int]:
    """The encoder from segment_anything's registry (or ImageEncoderViT with `model_kwargs`), weights, input size."""
    from segment_anything import sam_model_registry
    from segment_anything.modeling import ImageEncoderViT

    what = "sam teacher (segment_anything)"
    if spec.weights is not None and state is None:
        raise WeightsError(
            f"{what}: {spec.weights!r} is not a local file, and segment_anything has no hub. Download Meta's "
            f"checkpoint, e.g. {META_URL}{META_FILES[size]}, and pass its path; or use `source: timm` with "
            "`weights: sa1b`."
        )
    if options.model_kwargs:
        args = {**ENCODER_ARGS, "norm_layer": partial(nn.LayerNorm, eps=1e-6), **SIZES[size], **options.model_kwargs}
        encoder = ImageEncoderViT(**args)
    else:  # the official builder; it would torch.load without weights_only, so the weights are loaded below
        encoder = sam_model_registry[f"vit_{size}"](checkpoint=None).image_encoder
    if state is not None:
        load_strict(encoder, state, Path(spec.weights), what, check="`size` / `model_kwargs`")
    native = int(encoder.img_size)
    resize_encoder(encoder, spec.image_size or native)
    return encoder, native


def build_timm(size: str, state: dict | None, spec: TeacherSpec, options: SamTeacher.Options) -> tuple[nn.Module, int]:
    """timm's samvit with SAM's LayerNorm eps; hub tags (sa1b) through timm, local files through its converter."""
    from timm.models.vision_transformer_sam import checkpoint_filter_fn

    name = TIMM_NAMES[size]
    pretrained = spec.weights is not None and state is None
    if pretrained and spec.weights not in ("hub", "default"):
        name = f"{name}.{spec.weights}"
    args = {"num_classes": 0, "norm_layer": partial(nn.LayerNorm, eps=options.timm_layer_norm_eps)}
    if pretrained:
        check_timm_tag(name, "sam teacher (timm)")
    try:
        net = timm.create_model(name, pretrained=pretrained, **args, **options.model_kwargs)
    except (TypeError, AssertionError) as exc:  # model_kwargs the model does not take
        raise build_error(exc, options.model_kwargs, "sam teacher (timm)") from exc
    except (RuntimeError, OSError) as exc:  # hub errors (offline, not cached) are OSErrors
        if not pretrained:  # nothing was downloaded: the model_kwargs build no model (a negative size)
            if isinstance(exc, OSError):
                raise
            raise build_error(exc, options.model_kwargs, "sam teacher (timm)") from exc
        probe = {**args, **options.model_kwargs}
        probe_build(
            lambda: timm.create_model(name, pretrained=False, **probe), options.model_kwargs, "sam teacher (timm)"
        )
        raise WeightsError(
            f"sam teacher (timm): could not create {name!r} with pretrained weights from the hub (looked in the "
            f"Hugging Face cache, HF_HOME / ~/.cache/huggingface): {type(exc).__name__}: {exc}. Offline, pass a "
            f"local file instead: Meta's {META_FILES[size]} ({META_URL}) or timm's model.safetensors."
        ) from exc
    if state is not None:
        state = checkpoint_filter_fn({f"image_encoder.{k}": v for k, v in state.items()}, net)  # timm's converter
        load_strict(net, state, Path(spec.weights), f"sam teacher (timm {name})", check="`size` / `model_kwargs`")
    return net, int(net.patch_embed.img_size[0])


BUILDERS = {"segment_anything": (build_segment_anything, SegmentAnythingTower), "timm": (build_timm, TimmSamTower)}


@TEACHERS.register("sam")
class SamTeacher(Teacher):
    """SAM ViT image encoder; see the module docstring for input, levels and sources."""

    @dataclass
    class Options:
        source: Literal["segment_anything", "timm"] = "segment_anything"
        size: Literal["b", "l", "h"] | None = None  # None: from the checkpoint, b for random / hub weights
        model_kwargs: dict = field(default_factory=dict)  # ImageEncoderViT / timm samvit arguments (tiny encoders)
        timm_layer_norm_eps: float = 1e-6  # SAM's own; timm's samvit default is 1e-5
        # the relative-position attention (sam_attention.py): the bias folded into PyTorch's fused attention,
        # FlexAttention, or each library's own (segment_anything: written out; timm: a dense mask, math kernel)
        attention: Literal["folded", "flex", "library"] = "folded"

    def __init__(self, spec: TeacherSpec, options: Options) -> None:
        super().__init__(spec)
        what = f"sam teacher ({options.source})"
        refuse_sha256_without_file(spec.weights, spec.sha256, what)
        state = digest = None
        if spec.weights is not None and is_local(spec.weights):
            path = local_path(spec.weights, what)
            digest = verify_sha256(path, spec.sha256, what)
            state = encoder_state(path, what)
        size = options.size or "b"
        if state is not None and not options.model_kwargs:  # an official size: the checkpoint says which
            size = size_of(state, path, what)
            if options.size not in (None, size):
                raise WeightsError(f"{what}: {str(path)!r} is SAM ViT-{size}, but size is {options.size!r}")
        build, tower_type = BUILDERS[options.source]
        net, native = build(size, state, spec, options)
        self.tower = tower_type(net)
        if options.attention != "library":
            fuse_sam_attention(net, options.attention)
        levels = self.tower.levels = check_levels(spec.levels, self.tower.depth, what)
        self.meta = TeacherMeta(
            name=f"sam_vit_{size}" if not options.model_kwargs else "sam_vit_custom",
            source=options.source,
            architecture=type(net).__name__,
            embed_dim=self.tower.width,
            patch_size=self.tower.patch_size,
            native_size=native,
            mean=SAM_MEAN,
            std=SAM_STD,
            levels=levels,
            resize="longest_pad",
            weights=spec.weights or "random",
            sha256=digest,
            num_params=count_params(net),
        )

    def forward(self, x: Tensor) -> TeacherOutput:
        """(B, 3, S, S) preprocessed, padded images -> levels (B, C, S/p, S/p) (p = 16); no summary."""
        return TeacherOutput(levels=tuple(self.tower(x)), summary=None)
