"""Decode head per task, as SAK: per level Linear(D -> D/4) on tokens, upsample to H/4, concatenate,
Conv3x3 + BN + GELU, Conv1x1 to the task's channels, bilinear upsample to the input size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
            maps.append(F.interpolate(x, size=quarter, mode="bilinear", align_corners=False))
        x = self.classifier(self.fuse(torch.cat(maps, dim=1)))
        return F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
