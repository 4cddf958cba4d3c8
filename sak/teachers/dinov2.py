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
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..registry import TEACHERS
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
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
from .weights import (
    WeightsError,
    bare_name_hint,
    is_local,
    load_state_dict,
    load_strict,
    local_path,
    refuse_sha256_without_file,
    verify_sha256,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

PATCH = 14
NATIVE = 518
HUB_TAGS = ("hub", "default", "lvd142m")  # Meta's and timm's name for the one pretraining (LVD-142M)
META_URL = "https://dl.fbaipublicfiles.com/dinov2"
HF_CONFIGS = {  # the facebook/dinov2-* config.json values, for a weights file that comes without one
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
    "giant": {"hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24, "use_swiglu_ffn": True},
}
HF_COMMON = {"image_size": NATIVE, "patch_size": PATCH, "layerscale_value": 1.0, "mlp_ratio": 4, "layer_norm_eps": 1e-6}
META_ARCH = {"small": "vits14", "base": "vitb14", "large": "vitl14", "giant": "vitg14"}
Source = Literal["timm", "transformers", "meta"]


def variant_names(size: str, registers: bool) -> dict[str, str]:
    """Each library's name for a size: timm model, transformers hub id, Meta's torch.hub entry."""
    return {  # Meta's architecture "vit_giant2" is timm's vit_giant_patch14_dinov2
        "timm": f"vit_{size}_patch14_{'reg4_' if registers else ''}dinov2",
        "transformers": f"facebook/dinov2-{'with-registers-' if registers else ''}{size}",
        "meta": f"dinov2_{META_ARCH[size]}{'_reg4' if registers else ''}",
    }


@dataclass
class Weights:
    """What `spec.weights` names, read once: a hub tag, a file (its state dict and key layout) or a directory."""

    kind: Literal["random", "tag", "file", "dir"]
    value: str | None = None
    path: Path | None = None
    state: dict[str, Tensor] | None = None
    layout: Source | None = None
    digest: str | None = None

    @property
    def registers(self) -> bool | None:
        """Whether the checkpoint has register tokens (None when it cannot tell before loading)."""
        if self.state is None:
            return None
        return any(k.endswith(("reg_token", "register_tokens")) for k in self.state)


def key_layout(state: dict[str, Tensor], path: Path, what: str) -> Source:
    """Which library wrote a DINOv2 state dict, from its key names."""
    keys = set(state)
    if any(re.match(r"^(dinov2\.)?embeddings\.", k) for k in keys):
        return "transformers"
    if keys & {"mask_token", "register_tokens"} or any(".mlp.w12." in k for k in keys):
        return "meta"
    if "pos_embed" in keys or any(k.startswith("blocks.") for k in keys):
        return "timm"
    raise WeightsError(
        f"{what}: {str(path)!r} is not a DINOv2 checkpoint written by timm, transformers or Meta "
        f"(keys e.g. {sorted(keys)[:4]})"
    )


def read_weights(spec: TeacherSpec, what: str) -> Weights:
    """Classify `spec.weights`; a file is verified against `spec.sha256` and read once."""
    weights = spec.weights
    refuse_sha256_without_file(weights, spec.sha256, what)
    if weights is None:
        return Weights("random")
    if not is_local(weights):
        return Weights("tag", weights)
    path = local_path(weights, what, directory=True)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsError(
                f"{what}: directory {str(path)!r} has no config.json; a directory must be what transformers' "
                "save_pretrained writes (or a hub snapshot: config.json + model.safetensors). Pass a single "
                f"checkpoint file directly{bare_name_hint(weights)}."
            )
        # every file from_pretrained might read weights from (shards and their index included): the digest is
        # that of the one file it will read, or none, so that a sha256 is never checked against a file left unread
        files = sorted(p for p in path.iterdir() if p.name.endswith((".safetensors", ".bin", ".index.json")))
        single = len(files) == 1 and files[0].name in ("model.safetensors", "pytorch_model.bin")
        digest = verify_sha256(files[0], spec.sha256, what) if single else None
        if spec.sha256 and digest is None:
            raise WeightsError(
                f"{what}: sha256 needs a directory with one weights file (model.safetensors or pytorch_model.bin) "
                f"for transformers to read; {str(path)!r} holds {[p.name for p in files]}"
            )
        return Weights("dir", weights, path, layout="transformers", digest=digest)
    digest = verify_sha256(path, spec.sha256, what)
    state = load_state_dict(path, what)
    return Weights("file", weights, path, state, key_layout(state, path, what), digest)


def choose_registers(wanted: bool | None, found: bool | None, where: str, what: str) -> bool:
    if wanted is not None and found is not None and wanted != found:
        has = "has" if found else "has no"
        raise WeightsError(f"{what}: registers={wanted}, but {where} {has} register tokens; drop the option")
    return bool(found if found is not None else wanted)


@dataclass
class Built:
    """A backbone ready to run, and what the teacher's metadata needs from its library."""

    backbone: nn.Module
    name: str
    native_size: int
    weights: str
    digest: str | None
    registers: bool
    resampling: str  # how the position embeddings follow an input size other than the native one


# ----------------------------------------------------------------------------------------------
# backbones: each library's model, levels out as (B, C, h, w)
# ----------------------------------------------------------------------------------------------
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


class HFBackbone(nn.Module):
    """transformers' Dinov2Model / Dinov2WithRegistersModel; `hidden_states[i + 1]` is block i's output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        self.levels: tuple[int, ...] = ()
        self.depth = int(cfg.num_hidden_layers)
        self.width = int(cfg.hidden_size)
        self.patch_size = int(cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0])
        self.prefix = 1 + int(getattr(cfg, "num_register_tokens", 0))

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        out = self.model(pixel_values=x, output_hidden_states=True)
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        maps = [
            rearrange(out.hidden_states[i + 1][:, self.prefix :], "b (h w) c -> b c h w", h=h, w=w) for i in self.levels
        ]
        return maps, out.pooler_output  # the class token after the final layernorm: (B, C)


# ----------------------------------------------------------------------------------------------
# timm and meta sources
# ----------------------------------------------------------------------------------------------
def create_timm(name: str, kwargs: dict, size: int, tag: str | None, what: str) -> nn.Module:
    """timm's model at input `size`; with a tag, its hub weights, resampled by timm at load if needed."""
    args = {"num_classes": 0, **kwargs, "img_size": size}
    full = f"{name}.{'lvd142m' if tag in ('hub', 'default') else tag}" if tag else name
    try:
        return timm.create_model(full, pretrained=tag is not None, **args)
    except TypeError as exc:
        raise ValueError(f"{what}: timm's {name} does not take model_kwargs {kwargs}: {exc}") from exc
    except (RuntimeError, OSError) as exc:  # offline / not cached: huggingface_hub errors are OSErrors
        from huggingface_hub import constants

        repo = f"timm/{full}"
        raise WeightsError(
            f"{what}: could not load {full!r} from the Hugging Face hub (repo {repo}; looked in the Hugging Face "
            f"cache {constants.HF_HUB_CACHE}, HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}): "
            f"{type(exc).__name__}: {str(exc).rstrip('.')}. Offline, pass a local file instead: download "
            f"https://huggingface.co/{repo}/resolve/main/model.safetensors, or Meta's .pth, and set "
            "`weights: /path/to/model.safetensors`."
        ) from exc


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
    net = create_timm(name, kwargs, spec.image_size or native, w.value if w.kind == "tag" else None, what)
    if w.kind == "file":
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = flatten_block_chunks(w.state) if w.layout == "meta" else dict(w.state)
        state = checkpoint_filter_fn(state, net)  # converts Meta's keys too; resamples pos_embed (antialiased)
        load_strict(net, {k: v for k, v in state.items() if not k.startswith("head.")}, w.path, what)
    rule = "bicubic, antialiased, resampled once at load (timm's checkpoint_filter_fn)"
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
    partial_path = path.with_suffix(".partial")
    try:
        torch.hub.download_url_to_file(url, str(partial_path), progress=True)
    except OSError as exc:  # URLError / HTTPError / no disk space
        raise WeightsError(f"{what}: could not download {url} to {path}: {exc}. Offline, {todo}") from exc
    os.replace(partial_path, path)
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
        state.setdefault("mask_token", torch.zeros(1, net.embed_dim))  # timm's converter recognises Meta by it
        if "pos_embed" in state:
            state["pos_embed"] = resample_meta_pos_embed(state["pos_embed"], net.patch_embed.grid_size, reg)
        load_strict(net, checkpoint_filter_fn(state, net), w.path, what)  # Meta keys -> timm keys
    rule = "Meta's: bicubic, " + ("antialiased, to size" if reg else "no antialias, scale (n + 0.1) / M")
    return Built(TimmBackbone(net), names["meta"], native, w.value or "random", w.digest, reg, rule + ", once at load")


# ----------------------------------------------------------------------------------------------
# transformers source
# ----------------------------------------------------------------------------------------------
def hf_classes(registers: bool) -> tuple[type, type]:
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    return (Dinov2WithRegistersConfig, Dinov2WithRegistersModel) if registers else (Dinov2Config, Dinov2Model)


def hf_config(size_name: str, registers: bool, kwargs: dict, beside: Path | None, what: str) -> PretrainedConfig:
    """A config for weights that come without one: config.json beside the file, else facebook/dinov2-<size>'s
    values; `model_kwargs` override config fields (unknown fields are errors)."""
    if beside is not None and (beside / "config.json").is_file():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(beside))
        if config.model_type not in ("dinov2", "dinov2_with_registers"):
            raise WeightsError(f"{what}: {beside / 'config.json'} describes a {config.model_type!r} model, not DINOv2")
        config_type = type(config)
    else:
        config_type, _ = hf_classes(registers)
        config = config_type(**HF_COMMON, **HF_CONFIGS[size_name])
    valid = set(config_type().to_dict())
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(
            f"{what}: model_kwargs {unknown} are not {config_type.__name__} fields; valid: {sorted(valid)}"
        )
    for key, value in kwargs.items():
        setattr(config, key, value)
    return config


def check_loading(info: dict, where: str, what: str) -> None:
    """transformers only warns about missing weights (it initialises them at random): a teacher must not."""
    missing = sorted(k for k in info["missing_keys"] if not k.endswith("mask_token"))
    mismatched = sorted(str(k) for k in info["mismatched_keys"])
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith("classifier."))
    if missing or mismatched or unexpected:
        raise WeightsError(
            f"{what}: {where} does not fit the model ({len(missing)} missing keys, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}; {len(mismatched)} shape mismatches, e.g. "
            f"{mismatched[:2]}). Check `size` / `model_kwargs` against the checkpoint."
        )


def load_hf_pretrained(repo: str, kwargs: dict, what: str) -> nn.Module:
    """`from_pretrained` on a hub id or a save_pretrained directory (both key namings, via transformers)."""
    from huggingface_hub import constants
    from transformers import AutoConfig

    if kwargs:
        raise ValueError(f"{what}: model_kwargs apply to weights without a config.json; {repo!r} brings its own")
    try:
        config = AutoConfig.from_pretrained(repo)
        if config.model_type not in ("dinov2", "dinov2_with_registers"):
            raise WeightsError(f"{what}: {repo!r} is a {config.model_type!r} model, not DINOv2")
        model, info = hf_classes(config.model_type == "dinov2_with_registers")[1].from_pretrained(
            repo, dtype=torch.float32, output_loading_info=True
        )
    except OSError as exc:
        raise WeightsError(
            f"{what}: could not load {repo!r} with transformers (looked in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE}, HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}): {str(exc).rstrip('.')}. "
            f"Offline, fetch it elsewhere (`hf download {repo} --local-dir DIR`) and set `weights: DIR`, or pass "
            "its model.safetensors."
        ) from exc
    check_loading(info, repr(repo), what)
    return model


def build_transformers(
    size_name: str, registers: bool | None, kwargs: dict, spec: TeacherSpec, w: Weights, what: str
) -> Built:
    if w.kind == "file" and w.layout != "transformers":
        raise WeightsError(f"{what}: {w.value!r} has {w.layout}'s key names; use `source: {w.layout}`")
    if w.kind == "tag" and w.value not in ("hub", "default") and "/" not in w.value:
        raise WeightsError(
            f"{what}: source transformers takes a model id such as facebook/dinov2-base, not {w.value!r}"
        )
    if w.kind in ("dir", "tag"):
        name = str(w.path) if w.kind == "dir" else w.value
        if name in ("hub", "default"):
            name = variant_names(size_name, bool(registers))["transformers"]
        model = load_hf_pretrained(name, kwargs, what)
    else:  # random, or a bare file: config.json beside it, else facebook/dinov2-<size>'s values, + model_kwargs
        found = w.registers if w.registers is not None else registers
        beside = w.path.parent if w.kind == "file" else None
        config = hf_config(size_name, bool(found), kwargs, beside, what)
        _, model_type = hf_classes(config.model_type == "dinov2_with_registers")
        if w.kind == "random":
            model = model_type(config)
        else:
            state = dict(w.state)
            if not any(k.endswith("embeddings.mask_token") for k in state):  # unused at inference; timm drops it
                state["embeddings.mask_token"] = torch.zeros(1, config.hidden_size)
            model, info = model_type.from_pretrained(None, config=config, state_dict=state, output_loading_info=True)
            check_loading(info, repr(str(w.path)), what)
        name = variant_names(size_name, config.model_type == "dinov2_with_registers")["transformers"]
    reg = choose_registers(registers, model.config.model_type == "dinov2_with_registers", "its config", what)
    size = model.config.image_size
    native = int(size if isinstance(size, int) else size[0])
    antialias = "antialiased" if reg else "no antialias"
    rule = f"bicubic, {antialias}, to size, at every forward (transformers' interpolate_pos_encoding)"
    return Built(HFBackbone(model.float().eval()), name, native, w.value or "random", w.digest, reg, rule)


def infer_source(weights: Weights) -> Source:
    """transformers for a config.json directory, transformers-named files and `org/name` ids; meta for Meta's
    key names; timm otherwise (SAK's choice, and the tags hub / lvd142m)."""
    if weights.layout is not None:
        return weights.layout
    if weights.kind == "tag" and "/" in weights.value:
        return "transformers"
    return "timm"


BUILDERS = {"timm": build_timm, "transformers": build_transformers, "meta": build_meta}


@TEACHERS.register("dinov2")
class DINOv2Teacher(Teacher):
    """DINOv2 ViT-S/B/L/g with patch 14; see the module docstring for sources, levels and sizes."""

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
            resize="square",
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
        """
        x, _ = resize_images(to_float01(images), self.input_size, "square")
        x = x.clamp(0.0, 1.0)
        if self.spec.normalization == "imagenet":
            return normalize(x, IMAGENET_MEAN, IMAGENET_STD)
        return normalize(x, self.meta.mean, self.meta.std)

    def forward(self, x: Tensor) -> TeacherOutput:
        """(B, 3, S, S) preprocessed images -> levels (B, C, S/14, S/14) and the class token (B, C)."""
        levels, summary = self.backbone(x)
        return TeacherOutput(levels=tuple(levels), summary=summary)


__all__ = ["DINOv2Teacher", "resample_meta_pos_embed", "variant_names"]
