"""Teacher-Specific Adapter Path (TSAP): a chain of lightweight adapters fed by every TAS block.

The path input at block i is adapter_i(path_{i-1} + tas_i), starting from adapter_0(patch embedding)
(SAK, ICLR 2025). The adapter type is a plug-in (registry `ADAPTERS`, constructor `(dim, down_ratio)`),
chosen per teacher in the recipe (`teachers[i].adapter`). Its forward takes the (B, N, D) tokens, and
also the `TokenGrid` they lie on when it has a parameter named `grid` (an adapter that mixes neighbouring
patches needs it: the grid is not square on NYUD's 448 x 576 crops, and cannot be told from N).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..registry import ADAPTERS, check_call


@dataclass(frozen=True)
class TokenGrid:
    """How a (B, N, D) token sequence of the stem is laid out: `prefix` class / register tokens first, then
    the h x w patch grid row by row (N = prefix + h * w)."""

    prefix: int
    h: int
    w: int

    def split(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N, D) -> the prefix tokens (B, prefix, D) and the patches as a map (B, D, h, w)."""
        if tokens.ndim != 3 or tokens.shape[1] != self.prefix + self.h * self.w:
            raise ValueError(
                f"tokens of shape {tuple(tokens.shape)} do not lie on {self}: expected (B, "
                f"{self.prefix + self.h * self.w}, D), {self.prefix} prefix tokens + {self.h} x {self.w} patches"
            )
        patches = rearrange(tokens[:, self.prefix :], "b (h w) d -> b d h w", h=self.h, w=self.w)
        return tokens[:, : self.prefix], patches

    def join(self, prefix: Tensor, patches: Tensor) -> Tensor:
        """The inverse of `split`: prefix tokens (B, prefix, D) and a map (B, D, h, w) -> (B, N, D)."""
        if prefix.shape[1] != self.prefix or tuple(patches.shape[-2:]) != (self.h, self.w):
            raise ValueError(
                f"prefix tokens {tuple(prefix.shape)} and patch map {tuple(patches.shape)} do not make {self}"
            )
        return torch.cat([prefix, rearrange(patches, "b d h w -> b (h w) d")], dim=1)


def takes_grid(adapter: type[nn.Module]) -> bool:
    """Whether an adapter class's forward has a parameter named `grid` (then it is given the TokenGrid)."""
    return "grid" in inspect.signature(adapter.forward).parameters


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


def tracks_running_stats(module: nn.Module) -> bool:
    """Whether a forward in training mode updates buffers (batch norm's running statistics)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in module.modules())


class TeacherSpecificAdapterPath(nn.Module):
    """One path per teacher: depth + 1 adapters and a LayerNorm per output level."""

    def __init__(self, dim: int, depth: int, levels: list[int], adapter: str = "bottleneck", down_ratio: int = 4):
        super().__init__()
        cls = ADAPTERS.get(adapter)
        check_call(cls, (dim, down_ratio), f"adapter {adapter!r}", "(dim, down_ratio)")
        self.adapters = nn.ModuleList(cls(dim, down_ratio) for _ in range(depth + 1))
        self.takes_grid = takes_grid(cls)
        self.grad_checkpointing = False  # student.grad_checkpointing: each adapter recomputed in backward
        self.levels = list(levels)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in levels)

    def forward(self, embedded: Tensor, block_outputs: list[Tensor], grid: TokenGrid | None = None) -> list[Tensor]:
        """embedded: (B, N, D) TAS tokens after the patch embedding; block_outputs: every TAS block's
        (B, N, D) output; grid: their layout, required by an adapter type that takes one. Returns the
        normalised path tokens at each level."""
        if self.takes_grid and grid is None:
            raise ValueError(
                f"adapter {type(self.adapters[0]).__name__} takes the token grid: call the path with grid=TokenGrid(...)"
            )
        kwargs = {"grid": grid} if self.takes_grid else {}
        recompute = self.grad_checkpointing and torch.is_grad_enabled()

        def run(adapter: nn.Module, x: Tensor) -> Tensor:  # keeps only x for backward when recomputing
            # (not an adapter with batch-norm running statistics: recomputing it would update them twice a step)
            again = recompute and not (self.training and tracks_running_stats(adapter))
            out = checkpoint(adapter, x, use_reentrant=False, **kwargs) if again else adapter(x, **kwargs)
            if out.shape != x.shape:  # the next block's tokens are added to it
                raise ValueError(
                    f"adapter {type(adapter).__name__} turned tokens {tuple(x.shape)} into {tuple(out.shape)}: an "
                    "adapter maps (B, N, D) tokens to the same shape"
                )
            return out

        path = run(self.adapters[0], embedded)
        out = []
        for i, tas in enumerate(block_outputs):
            path = run(self.adapters[i + 1], path + tas)
            if i in self.levels:
                out.append(self.norms[self.levels.index(i)](path))
        return out
