"""Decode head per task, as SAK: per level Linear(D -> D/4) on tokens, upsample to H/4, concatenate,
Conv3x3 + BN + GELU, Conv1x1 to the task's channels, bilinear upsample to the input size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _UpsampleKeepingDtype(torch.autograd.Function):
    """Bilinear upsampling (align_corners=False) in the input's dtype whatever autocast says, backward in
    float32. CUDA autocast runs bilinear upsampling in float32: a head's bf16 projections would be upsampled
    to float32 maps, concatenated in float32 and cast back to bf16 for the convolution; at SAK's stage-2
    shapes the five heads' forward moved 6.3 GB more that way (counted under CUDA autocast by
    benchmarks/step_traffic.py, docs/benchmarks.md). The values
    are the same: the kernel computes in float32 either way and rounds the output once (tests compare them
    bit for bit); the backward is autocast's own, the gradient upsampled back in float32 and rounded to the
    input's dtype once."""

    @staticmethod
    def forward(ctx, x: Tensor, size: tuple[int, int]) -> Tensor:
        ctx.input_size, ctx.dtype = tuple(x.shape), x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        if grad.dtype in (torch.float16, torch.bfloat16):
            grad = grad.float()
        g = torch.ops.aten.upsample_bilinear2d_backward(grad, list(grad.shape[-2:]), list(ctx.input_size), False)
        return g.to(ctx.dtype), None


class DecodeHead(nn.Module):
    def __init__(self, dim: int, num_levels: int, channels: int) -> None:
        super().__init__()
        inner = dim // 4
        self.proj = nn.ModuleList(nn.Linear(dim, inner) for _ in range(num_levels))
        self.fuse = nn.Sequential(
            nn.Conv2d(inner * num_levels, inner * num_levels, 3, padding=1),
            nn.BatchNorm2d(inner * num_levels),
            nn.GELU(),
        )
        self.classifier = nn.Conv2d(inner * num_levels, channels, 1)

    def forward(self, levels: list[Tensor], grid: tuple[int, int], out_size: tuple[int, int]) -> Tensor:
        """levels: (B, h*w, D) patch tokens per level -> logits (B, channels, H, W)."""
        quarter = (out_size[0] // 4, out_size[1] // 4)
        maps = []
        for proj, tokens in zip(self.proj, levels, strict=True):
            x = proj(tokens).transpose(1, 2).unflatten(2, grid)  # (B, D/4, h, w)
            maps.append(_UpsampleKeepingDtype.apply(x, quarter))
        x = self.classifier(self.fuse(torch.cat(maps, dim=1)))
        return F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
