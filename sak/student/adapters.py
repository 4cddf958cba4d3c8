"""Teacher-Specific Adapter Path (TSAP): a chain of lightweight adapters fed by every TAS block.

The path input at block i is adapter_i(path_{i-1} + tas_i), starting from adapter_0(patch embedding)
(REFERENCE §1). The adapter type is a plug-in (registry `ADAPTERS`, constructor `(dim, down_ratio)`),
chosen per teacher in the recipe (`teachers[i].adapter`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import ADAPTERS


@ADAPTERS.register("bottleneck")
class BottleneckAdapter(nn.Module):
    """x + scale * up(GELU(down(x))), D -> D/r -> D, the scale a learnable scalar starting at 1; linear
    weights truncated-normal (std 0.02), biases zero, as the public SAK code initialises them."""

    def __init__(self, dim: int, down_ratio: int = 4) -> None:
        super().__init__()
        hidden = max(1, dim // down_ratio)
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        self.scale = nn.Parameter(torch.ones(1))
        for linear in (self.down, self.up):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D) -> (B, N, D)
        return x + self.scale * self.up(self.act(self.down(x)))


class TeacherSpecificAdapterPath(nn.Module):
    """One path per teacher: depth + 1 adapters and a LayerNorm per output level."""

    def __init__(self, dim: int, depth: int, levels: list[int], adapter: str = "bottleneck", down_ratio: int = 4):
        super().__init__()
        cls = ADAPTERS.get(adapter)
        self.adapters = nn.ModuleList(cls(dim, down_ratio) for _ in range(depth + 1))
        self.levels = list(levels)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in levels)

    def forward(self, embedded: Tensor, block_outputs: list[Tensor]) -> list[Tensor]:
        """embedded: (B, N, D) TAS tokens after the patch embedding; block_outputs: every TAS block's
        (B, N, D) output. Returns the normalised path tokens at each level."""
        path = self.adapters[0](embedded)
        out = []
        for i, tas in enumerate(block_outputs):
            path = self.adapters[i + 1](path + tas)
            if i in self.levels:
                out.append(self.norms[self.levels.index(i)](path))
        return out
