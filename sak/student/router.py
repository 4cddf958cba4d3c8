"""Mixture-of-Representations (MoR) routers, one per (task, level), over T + 1 experts (the TAS
feature and the T adapter-path features). Registry `ROUTERS`; constructor `(dim, num_experts)`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import ROUTERS


class Router(nn.Module):
    """Base: `weights(tas_tokens) -> (B, E) or (B, N, E)`; forward mixes the experts with them."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts

    def weights(self, tas: Tensor) -> Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, tas: Tensor, experts: list[Tensor]) -> Tensor:
        """tas: (B, N, D) TAS tokens; experts: E tensors (B, N, D) -> mixed (B, N, D)."""
        w = self.weights(tas)
        if w is None:
            return torch.stack(experts).sum(0)
        b, n, d = experts[0].shape
        # The weighted sum as one batched (1 x E) @ (E x ...) product over the stacked experts, in their
        # dtype whatever autocast says: against a broadcast product and a sum it reads and writes the
        # full-size (B, N, D) tensors about half as often, forward and backward
        # (benchmarks/results/step_traffic.md, stage 2).
        with torch.autocast(tas.device.type, enabled=False):
            if w.ndim == 2:  # one weight vector per image: (B, 1, E) @ (B, E, N*D)
                stacked = torch.stack(experts, dim=1).view(b, len(experts), n * d)
                mixed = torch.bmm(w.to(stacked.dtype)[:, None, :], stacked)
            else:  # one per token: (B*N, 1, E) @ (B*N, E, D)
                stacked = torch.stack(experts, dim=2).view(b * n, len(experts), d)
                mixed = torch.bmm(w.to(stacked.dtype).reshape(b * n, 1, -1), stacked)
        return mixed.view(b, n, d)


@ROUTERS.register("noisy")
class NoisyRouter(Router):
    """SAK's image-level noisy gating: MLP D -> D/2 -> LayerNorm -> GELU -> 2E logits per token,
    mean-pooled over tokens; half are gate logits, half noise scales (softplus + 0.01); Gaussian noise
    is added in training only; softmax over the E experts, no top-k."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__(dim, num_experts)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.LayerNorm(dim // 2), nn.GELU(), nn.Linear(dim // 2, 2 * num_experts)
        )

    def weights(self, tas: Tensor) -> Tensor:
        logits = self.mlp(tas).mean(1)  # (B, 2E)
        clean, raw_noise = logits.chunk(2, dim=-1)
        if self.training:
            clean = clean + torch.randn_like(clean) * (F.softplus(raw_noise) + 0.01)
        return clean.softmax(-1)


@ROUTERS.register("none")
class SumRouter(Router):
    """No routing: the plain sum of the experts (`router: none` in SAK's ablation)."""

    def weights(self, tas: Tensor) -> None:
        return None


@ROUTERS.register("pixel")
class PixelRouter(Router):
    """Our extension: a per-token (1x1) gate, softmax over experts at every position."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__(dim, num_experts)
        self.gate = nn.Linear(dim, num_experts)

    def weights(self, tas: Tensor) -> Tensor:
        return self.gate(tas).softmax(-1)  # (B, N, E)
