"""What a DINOv2 teacher's `weights` names, and which library wrote it.

Read once for every source (timm, transformers, Meta): a hub tag, a model id, a save_pretrained directory or a
checkpoint file, whose key names tell the library that wrote it. The sources themselves are in dinov2.py
(timm, Meta) and dinov2_hf.py (transformers).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import Tensor, nn

from .base import TeacherSpec
from .weights import (
    WeightsError,
    bare_name_hint,
    is_local,
    listing_digest,
    load_state_dict,
    local_path,
    refuse_sha256_without_file,
    verify_sha256,
)

PATCH = 14
NATIVE = 518
HUB_TAGS = ("hub", "default", "lvd142m")  # Meta's and timm's name for the one pretraining (LVD-142M)
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


HF_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


def config_model_type(path: Path) -> str | None:
    """The `model_type` of a config.json, which transformers' configs name and other libraries' (timm's,
    open_clip's) do not; None for a file without one, or that is not a JSON mapping."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


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
        model_type = config_model_type(path / "config.json")
        if model_type not in HF_MODEL_TYPES:  # another library's snapshot (timm's config has no model_type)
            if not single:
                raise WeightsError(
                    f"{what}: {str(path / 'config.json')!r} is not a transformers DINOv2 config (model_type "
                    f"{model_type!r}), so the directory is not one for transformers; pass its weights file "
                    f"directly (it holds {[p.name for p in files]})"
                )
            digest = verify_sha256(files[0], spec.sha256, what)
            state = load_state_dict(files[0], what)
            return Weights("file", weights, files[0], state, key_layout(state, files[0], what), digest)
        if spec.sha256 and not single:
            raise WeightsError(
                f"{what}: sha256 needs a directory with one weights file (model.safetensors or pytorch_model.bin) "
                f"for transformers to read; {str(path)!r} holds {[p.name for p in files]}"
            )
        # a sharded save: one digest over config.json, the index and the shards (it was None: a cache of these
        # features did not see the weights change)
        digest = (
            verify_sha256(files[0], spec.sha256, what) if single else listing_digest([path / "config.json", *files])
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


def infer_source(weights: Weights) -> Source:
    """transformers for a config.json directory, transformers-named files and `org/name` ids; meta for Meta's
    key names; timm otherwise (SAK's choice, and the tags hub / lvd142m)."""
    if weights.layout is not None:
        return weights.layout
    if weights.kind == "tag" and "/" in weights.value:
        return "transformers"
    return "timm"
