"""The teacher contract: a frozen vision model that turns a batch of images into `TeacherOutput`.

A teacher owns its preprocessing (size, resize mode, mean/std) because each foundation model was
trained with its own; `normalization="imagenet"` reproduces the official SAK code, which feeds the
same ImageNet-normalised image to every teacher.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ResizeMode = Literal["square", "longest_pad", "keep"]
# how a timm ViT built with dynamic_img_size meets the grid of each input (teachers with resize "keep")
KEEP_RESAMPLING = "bicubic, antialiased, to each input's grid at every forward (timm's dynamic_img_size)"


@dataclass(frozen=True)
class TeacherOutput:
    """What one teacher returns for one batch.

    Attributes:
        levels: one (B, C, h, w) map per configured block, final norm not applied (as SAK).
        summary: a (B, C) image-level vector (CLS token, pooled feature) or None.
    """

    levels: tuple[Tensor, ...]
    summary: Tensor | None = None

    def to(self, *args, **kwargs) -> TeacherOutput:
        """A copy with every tensor moved / cast (`Tensor.to` arguments)."""
        summary = None if self.summary is None else self.summary.to(*args, **kwargs)
        return TeacherOutput(tuple(t.to(*args, **kwargs) for t in self.levels), summary)


@dataclass
class TeacherSpec:
    """Options every teacher accepts (the recipe's per-teacher keys besides `options`).

    Attributes:
        weights: where the weights come from: a hub tag understood by the teacher's library, a
            local file (.safetensors, or .pth/.pt/.bin read with `weights_only=True`), or a
            directory. None builds the architecture with random weights (for tests).
        sha256: if given, the weights file must have this digest.
        levels: block indices whose outputs are returned; None = the teacher's default.
        image_size: input side length; None = the teacher's native size.
        normalization: "own" (the teacher's training mean/std) or "imagenet" (SAK's shared input).
        resize: "own" (the teacher's own input: the image resized to image_size x image_size, or SAM's
            letterbox) or "keep" (the image at its own size, cut to a multiple of the patch size, as the
            official SAK code feeds its teachers: NYUD's 448 x 576 crops keep their aspect; the position
            embeddings are resampled to the grid on each forward). "keep" is for the ViT teachers built
            through timm: dinov2 and clip with `source: timm`.
    """

    weights: str | None = None
    sha256: str | None = None
    levels: list[int] | None = None
    image_size: int | None = None
    normalization: Literal["own", "imagenet"] = "own"
    resize: Literal["own", "keep"] = "own"

    def __post_init__(self) -> None:
        if self.normalization not in ("own", "imagenet"):  # (a recipe is checked before; the Python API is not)
            raise ValueError(f"teacher normalization {self.normalization!r}: expected 'own' or 'imagenet'")
        if self.resize not in ("own", "keep"):
            raise ValueError(f"teacher resize {self.resize!r}: expected 'own' or 'keep'")
        if self.resize == "keep" and self.image_size is not None:
            raise ValueError(
                f"teacher resize 'keep' feeds the image at its own size, so image_size ({self.image_size}) has "
                "nothing to set (it would resample the position embeddings twice); leave image_size out"
            )


@dataclass(frozen=True)
class TeacherMeta:
    """Facts about a built teacher; shown by `sak teachers show` and written next to checkpoints."""

    name: str
    source: str  # library or file format the weights were read with
    architecture: str
    embed_dim: int  # channels of every returned level
    patch_size: int  # stride of the returned maps relative to the model input
    native_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    levels: tuple[int, ...]
    resize: ResizeMode = "square"
    weights: str = "random"
    sha256: str | None = None
    num_params: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_levels(depth: int, count: int = 4) -> list[int]:
    """Evenly spaced block indices ending at the last block, ceil(depth * k / count) - 1 for k = 1..count: 12 ->
    [2, 5, 8, 11], 24 -> [5, 11, 17, 23], 32 -> [7, 15, 23, 31], 40 -> [9, 19, 29, 39] and 27 (SigLIP so400m)
    -> [6, 13, 20, 26], every entry of the official SAK code's table (models/backbones/model_set.py,
    `out_indices_cfg`); where `count` does not divide `depth` a step of depth // count from the last block gave
    [8, 14, 20, 26] for so400m."""
    count = min(count, depth)
    return [-(-depth * k // count) - 1 for k in range(1, count + 1)]


def check_levels(
    levels: list[int] | tuple[int, ...] | None,
    count: int,
    what: str,
    default: tuple[int, ...] | None = None,
    unit: str = "block",
    hint: str = "",
) -> tuple[int, ...]:
    """The requested level indices (None: `default`, else SAK's four evenly spaced ending at the last).

    Each must name one of the `count` blocks (or stages), once, in increasing order. The libraries disagree
    on anything else: timm's `forward_intermediates` and a block loop return the outputs in block order with
    repeats dropped, while transformers' hidden states and open_clip's hooks follow the requested order, so
    the same recipe would pair different maps with the student's levels depending on the source.
    """
    chosen = tuple(levels) if levels is not None else tuple(default or default_levels(count))
    if not chosen or any(not 0 <= i < count for i in chosen) or list(chosen) != sorted(set(chosen)):
        raise ValueError(
            f"{what}: levels {list(chosen)} must be {unit} indices in 0..{count - 1}, each once and in increasing "
            f"order ({count} {unit}s{hint})"
        )
    return chosen


def to_float01(images: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] images (B, 3, H, W) -> float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    if images.numel() and not torch.compiler.is_compiling():
        # Float images of 0..255, or ones already mean/std normalised, gave features of a white or grey image
        # and no error. One look at the range (a GPU sync) only for float input: sak's data loaders give uint8.
        # The margins leave room for a resize's overshoot.
        lo, hi = (float(v) for v in torch.aminmax(images.detach()))
        if hi > 1.5 or lo < -0.5:
            raise ValueError(
                f"float images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]: "
                + ("divide images of 0..255 by 255" if hi > 1.5 and lo >= -0.5 else "pass them before mean/std")
                + " (or pass uint8)"
            )
    return images.float()


@functools.lru_cache(maxsize=64)
def _per_channel(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """(1, C, 1, 1) constant, made once per device and dtype: `torch.tensor(..., device="cuda")` in every
    step would be a blocking host-to-device copy, which waits for all the work queued on the GPU."""
    with torch.inference_mode(False), torch.no_grad():  # reusable by training after a first use in eval
        return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(x - mean) / std per channel of (B, C, H, W) images."""
    if torch.compiler.is_compiling():  # traced: the constants become part of the compiled graph
        m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    else:
        m, s = _per_channel(tuple(mean), x.device, x.dtype), _per_channel(tuple(std), x.device, x.dtype)
    return (x - m) / s


def letterbox_extent(image_hw: tuple[int, int], size: int) -> tuple[int, int]:
    """(h, w) of an (H, W) image with its longest side resized to `size`, aspect kept (resize "longest_pad"), as
    SAM's ResizeLongestSide rounds it; at least 1 pixel (SAM's rounds a side under half a pixel to 0 and stops)."""
    h, w = image_hw
    scale = size / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def image_tokens(grid: tuple[int, int], size: int, extent: tuple[int, int]) -> tuple[int, int]:
    """Rows and columns of a (h, w) grid over a `size` x `size` letterbox canvas that cover the image in its
    top-left `extent` (`letterbox_extent`), the rest covering only padding: a cell counts when its centre lies
    in the image, at least one per axis (on a 16 x 64 image at 64 px with 8 px cells, 2 of 8 rows)."""
    (gh, gw), (nh, nw) = grid, extent
    return min(gh, max(1, math.floor(nh * gh / size + 0.5))), min(gw, max(1, math.floor(nw * gw / size + 0.5)))


def resize_images(
    x: Tensor, size: int, mode: ResizeMode, multiple: int = 1, interpolation: str = "bicubic"
) -> tuple[Tensor, tuple[int, int]]:
    """Resize float images; returns the resized batch and the (h, w) of the valid (unpadded) region.

    square: bicubic (or the pretraining's `interpolation`: "bilinear" for some timm tags) to size x size
        (antialiased when shrinking, as PIL does), clamped to [0, 1]: bicubic overshoots at edges, where the
        libraries' eval transforms (PIL's 8-bit bicubic, e.g. timm's) saturate.
    longest_pad: longest side to `size`, aspect kept (SAM); padding is added after normalisation. Bilinear
        weights are never negative, so there is nothing to clamp.
    keep: no resize, crop down to a multiple of `multiple`.
    """
    h, w = x.shape[-2:]
    if mode == "square":
        if (h, w) != (size, size):
            if interpolation not in ("bicubic", "bilinear"):
                raise ValueError(f"interpolation {interpolation!r}: expected bicubic or bilinear")
            x = F.interpolate(x, size=(size, size), mode=interpolation, align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0)
        return x, (size, size)
    if mode == "longest_pad":
        nh, nw = letterbox_extent((h, w), size)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        return x, (nh, nw)
    if mode == "keep":
        nh, nw = h - h % multiple, w - w % multiple
        return x[..., :nh, :nw], (nh, nw)
    raise ValueError(f"unknown resize mode {mode!r}; expected square, longest_pad or keep")


class Teacher(nn.Module):
    """A frozen feature extractor. Subclasses build the network in `__init__`, set `self.meta`,
    and implement `forward(x) -> TeacherOutput` on preprocessed input.

    Subclasses declare their recipe options as a nested dataclass `Options`; unknown option keys
    are rejected when the recipe is validated, before anything is built.

    Use `sak.create_teacher`, which freezes the result; never call `.train()` expecting a change:
    a teacher stays in eval mode whatever its parent module does.
    """

    takes_resize_keep: ClassVar[bool] = False  # it honours spec.resize "keep" (meta.resize "keep"): recipes may ask

    @dataclass
    class Options:
        pass

    options_type: ClassVar[type] = Options
    meta: TeacherMeta
    channels_last: bool = False  # set by the engine for convolutional teachers
    weights_dtype: torch.dtype | None = None  # set by cast_weights: the whole forward runs in this dtype

    def __init__(self, spec: TeacherSpec) -> None:
        super().__init__()
        self.spec = spec

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.options_type = cls.__dict__.get("Options", cls.options_type)

    # -- frozen by construction -------------------------------------------------------------
    def freeze(self) -> Teacher:
        self.requires_grad_(False)
        super().train(False)
        return self

    def train(self, mode: bool = True) -> Teacher:  # noqa: ARG002 - a teacher ignores train()
        return super().train(False)

    def cast_weights(self, dtype: torch.dtype) -> Teacher:
        """Cast parameters and floating-point buffers to `dtype` once (`precision.teacher_weights: cast`).
        `encode` then feeds the network input of that dtype without autocast, whatever dtype it is asked
        for: no per-step weight casts, half the activation traffic, and LayerNorm / softmax inputs in
        `dtype` too (benchmarks/results/teacher_precision_cpu.md measures what that changes)."""
        self.to(dtype)
        self.weights_dtype = dtype
        return self

    # -- preprocessing ----------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        return self.spec.image_size or self.meta.native_size

    def preprocess(self, images: Tensor) -> Tensor:
        """Loader batch (uint8 or float [0, 1], any size) -> this teacher's normalised input."""
        x = to_float01(images)
        # meta.extra["interpolation"]: the pretraining's resize where it is not bicubic (absent otherwise, so that
        # the metadata of bicubic teachers, and the feature caches that record it, stay as they were)
        interpolation = self.meta.extra.get("interpolation", "bicubic")
        x, (h, w) = resize_images(x, self.input_size, self.meta.resize, self.meta.patch_size, interpolation)
        if self.spec.normalization == "imagenet":
            x = normalize(x, IMAGENET_MEAN, IMAGENET_STD)
        else:
            x = normalize(x, self.meta.mean, self.meta.std)
        if self.meta.resize == "longest_pad":  # zero padding after normalisation, as SAM does
            x = F.pad(x, (0, self.input_size - w, 0, self.input_size - h))
        return x

    def forward(self, x: Tensor) -> TeacherOutput:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x) -> TeacherOutput")

    @torch.inference_mode()
    def _infer(self, x: Tensor, dtype: torch.dtype | None) -> TeacherOutput:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.weights_dtype is not None:
            return self(x.to(self.weights_dtype))
        if dtype is None or dtype == torch.float32:
            return self(x)
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            return self(x)

    def encode(self, images: Tensor, dtype: torch.dtype | None = None) -> TeacherOutput:
        """preprocess + forward without autograd, in `dtype` autocast (or wholly in the dtype the weights were
        cast to, see `cast_weights`); float32 normal tensors out.

        Outputs are cloned out of inference mode so that losses may use them next to tensors that
        require grad.
        """
        out = self._infer(self.preprocess(images), dtype)
        if not isinstance(out, TeacherOutput):
            raise TypeError(
                f"teacher {self.meta.name}: its forward returned a {type(out).__name__}; it must return "
                "TeacherOutput(levels, summary): a tuple of (B, C, h, w) maps, and a (B, C) vector or None "
                "(sak.teachers.TeacherOutput, docs/adding-a-teacher.md)"
            )
        dims = self.level_dims
        if len(out.levels) != len(dims) or any(t.shape[1] != c for t, c in zip(out.levels, dims, strict=False)):
            raise ValueError(  # (what the student's aligners and the cache were built for)
                f"teacher {self.meta.name}: its forward returned {len(out.levels)} level(s) of shapes (C, h, w) "
                f"{[tuple(t.shape[1:]) for t in out.levels]}, but its meta promises {len(dims)} of {list(dims)} "
                f"channels (meta.levels {list(self.meta.levels)}; meta.extra['level_dims'] where they differ)"
            )
        summary = None if out.summary is None else out.summary.to(torch.float32, copy=True)
        levels = out.levels
        if self.meta.resize == "longest_pad":  # the tokens that cover the image, not its letterbox padding
            levels = self.image_region(levels, images.shape[-2:])
        promised = self.map_shapes(tuple(images.shape[-2:]))
        if [tuple(t.shape[1:]) for t in levels] != [tuple(s) for s in promised]:
            raise ValueError(  # (what the cache's shards are laid out for, and the student's maps are resized to)
                f"teacher {self.meta.name}: its forward returned maps of (C, h, w) "
                f"{[tuple(t.shape[1:]) for t in levels]} for images of {tuple(images.shape[-2:])} (input "
                f"{self.input_size}), but its level_shapes() promise {[tuple(s) for s in promised]}: input size / "
                f"stride a side (meta.patch_size {self.meta.patch_size}, meta.extra['level_strides'] where the levels' "
                "strides differ); a teacher whose maps are sized otherwise overrides level_shapes "
                "(docs/adding-a-teacher.md)"
            )
        # one copy each: out of inference mode, widened to float32, and contiguous (NCHW) even where the
        # network hands out permuted views (SAM's blocks are NHWC), so that the losses read dense memory
        levels = tuple(t.to(torch.float32, memory_format=torch.contiguous_format, copy=True) for t in levels)
        return TeacherOutput(levels, summary)

    def image_region(self, levels: tuple[Tensor, ...], image_hw: tuple[int, int]) -> tuple[Tensor, ...]:
        """A letterboxing teacher's (resize "longest_pad", SAM's) maps of (H, W) images, cropped to the rows and
        columns that cover the image (`image_tokens`): the student's maps and the task labels cover the image
        only, and the distillation loss resizes one map onto the other whole, so that a 448 x 576 crop (NYUD)
        would otherwise have its lower rows matched to SAM's padding tokens (14 of 64 rows at 1024 px) and every
        row shifted. Square images keep the whole grid."""
        extent = letterbox_extent(tuple(image_hw), self.input_size)
        cropped = []
        for t in levels:
            th, tw = image_tokens(tuple(t.shape[-2:]), self.input_size, extent)
            cropped.append(t[..., :th, :tw])
        return tuple(cropped)

    @property
    def level_dims(self) -> tuple[int, ...]:
        """Channels of each returned level (CNN teachers list them in meta.extra["level_dims"])."""
        dims = self.meta.extra.get("level_dims")
        return tuple(dims) if dims is not None else (self.meta.embed_dim,) * len(self.meta.levels)

    @property
    def level_strides(self) -> tuple[int, ...]:
        strides = self.meta.extra.get("level_strides")
        return tuple(strides) if strides is not None else (self.meta.patch_size,) * len(self.meta.levels)

    def level_shapes(self, image_size: int | None = None) -> list[tuple[int, int, int]]:
        """(C, h, w) of each level for a square input of `image_size` (default: the input size)."""
        size = image_size or self.input_size
        return [(c, size // s, size // s) for c, s in zip(self.level_dims, self.level_strides, strict=True)]

    def check_image_size(self, image_hw: tuple[int, int]) -> None:
        """Refuse loader images of (H, W) whose maps this teacher could not lay over the whole image (an error
        before training or a cache build starts); every size is fine by default."""

    def map_shapes(self, image_hw: tuple[int, int]) -> list[tuple[int, int, int]]:
        """(C, h, w) of each level `encode` returns for loader images of (H, W): `level_shapes()` of the teacher's
        input, cropped to the image for a letterboxing teacher (`image_region`); for resize "keep", the grid of
        the image cut to a multiple of the patch size."""
        h, w = image_hw
        if self.meta.resize == "keep":
            m = self.meta.patch_size
            return [
                (c, (h - h % m) // s, (w - w % m) // s)
                for c, s in zip(self.level_dims, self.level_strides, strict=True)
            ]
        shapes = self.level_shapes()
        if self.meta.resize == "longest_pad":
            extent = letterbox_extent((h, w), self.input_size)
            shapes = [(c, *image_tokens((gh, gw), self.input_size, extent)) for c, gh, gw in shapes]
        return shapes

    def extra_repr(self) -> str:
        m = getattr(self, "meta", None)
        return "" if m is None else f"name={m.name}, source={m.source}, levels={list(m.levels)}, dim={m.embed_dim}"


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
