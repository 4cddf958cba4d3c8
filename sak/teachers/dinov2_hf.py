"""DINOv2 through transformers: `Dinov2Model` / `Dinov2WithRegistersModel`, from a hub id, a save_pretrained
directory, or a bare model.safetensors (with config.json beside it, or facebook/dinov2-<size>'s values)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from safetensors import SafetensorError
from torch import Tensor, nn

from .base import TeacherSpec
from .dinov2_weights import (
    HF_MODEL_TYPES,
    NATIVE,
    PATCH,
    Built,
    Weights,
    choose_registers,
    config_model_type,
    variant_names,
)
from .weights import WeightsError, unpickling_reason

if TYPE_CHECKING:
    from transformers import PretrainedConfig

HF_CONFIGS = {  # the facebook/dinov2-* config.json values, for a weights file that comes without one
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
    "giant": {"hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24, "use_swiglu_ffn": True},
}
HF_COMMON = {"image_size": NATIVE, "patch_size": PATCH, "layerscale_value": 1.0, "mlp_ratio": 4, "layer_norm_eps": 1e-6}


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


def hf_classes(registers: bool) -> tuple[type, type]:
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    return (Dinov2WithRegistersConfig, Dinov2WithRegistersModel) if registers else (Dinov2Config, Dinov2Model)


def hf_config(size_name: str, registers: bool, kwargs: dict, beside: Path | None, what: str) -> PretrainedConfig:
    """A config for weights that come without one: config.json beside the file, else facebook/dinov2-<size>'s
    values; `model_kwargs` override config fields (unknown fields are errors)."""
    if beside is not None and (beside / "config.json").is_file():
        from transformers import AutoConfig

        model_type = config_model_type(beside / "config.json")  # (AutoConfig's error for none names no file)
        if model_type not in HF_MODEL_TYPES:
            raise WeightsError(
                f"{what}: {beside / 'config.json'} (beside the weights) describes "
                + (f"a {model_type!r} model, not DINOv2" if model_type else "no transformers model (no model_type)")
                + "; move the weights file to a folder without it, or give the DINOv2 config.json beside it"
            )
        config = AutoConfig.from_pretrained(str(beside))
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
        if config.model_type not in HF_MODEL_TYPES:
            raise WeightsError(f"{what}: {repo!r} is a {config.model_type!r} model, not DINOv2")
        model, info = hf_classes(config.model_type == "dinov2_with_registers")[1].from_pretrained(
            repo, dtype=torch.float32, output_loading_info=True
        )
    except (SafetensorError, pickle.UnpicklingError) as exc:  # a damaged or unsafe file in a local folder
        reason, hint = unpickling_reason(exc)
        raise WeightsError(f"{what}: transformers cannot read the weights in {repo!r} ({type(exc).__name__}: "
                           f"{reason[:200]}): {hint}") from exc  # fmt: skip
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
