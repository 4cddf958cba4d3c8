"""Mixture-of-Representations (MoR) routers, one per (task, level), over T + 1 experts (the TAS
feature and the T adapter-path features). Registry `ROUTERS`; constructor `(dim, num_experts)`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import ROUTERS


def mix_experts(experts: list[Tensor], weights: Tensor | None) -> Tensor:
    """sum_e w_e x_e: experts E tensors (B, N, D); weights (B, E) per image, (B, N, E) per token, or None for
    the plain sum -> (B, N, D), in the experts' dtype whatever autocast says."""
    if weights is None:
        return torch.stack(experts).sum(0)
    if weights.ndim == 2:
        return mix_experts_per_image(experts, [weights])[0]
    return mix_experts_per_token(experts, [weights])[0]


def mix_experts_per_image(experts: list[Tensor], weights: list[Tensor]) -> list[Tensor]:
    """Several per-image weightings (B, E) of the same experts (one per task; the noisy routers' in evaluation)
    -> one (B, N, D) mixture each.

    Two ways to compute the same sums, chosen by where they run (benchmarks/router_mix.py times both):
    - eager on the CPU, one batched product (B, T, E) @ (B, E, N*D) over the experts stacked once. Against a
      broadcast product and a sum per task it reads and writes the full-size tensors several times less,
      forward and backward, and each expert receives one gradient instead of one per task
      (benchmarks/results/step_traffic.md, stage 2); at the stage-2 GPU recipe's shapes it is 1.5 to 1.8x
      faster than the multiply-adds on a 2-core CPU (three runs; benchmarks/results/router_mix_cpu.md
      holds the last, 1.8x);
    - on an accelerator, or traced by torch.compile, E elementwise multiply-adds per task. The product's
      inner dimension is E = 4, for which cuBLAS ran a batched GEMV at about 50 GB/s on an H200: 4.3 ms per
      stage-2 level forward (benchmarks/results/profile_gpu_h200.txt), where an elementwise kernel runs at
      memory speed; compiled, inductor fuses the multiply-adds (2 to 5x faster than the compiled product on
      that CPU), where for the product it calls the same library kernel as eager."""
    if _use_multiply_adds(experts[0]):
        return [mix_by_multiply_adds(experts, w) for w in weights]
    b, n, d = experts[0].shape
    with torch.autocast(experts[0].device.type, enabled=False):
        stacked = torch.stack(experts, dim=1).view(b, len(experts), n * d)
        w = torch.stack(weights, dim=1).to(stacked.dtype)  # (B, T, E)
        mixed = torch.bmm(w, stacked)  # (B, T, N*D)
    return list(mixed.view(b, len(weights), n, d).unbind(1))  # backward: one stack of the tasks' gradients


def mix_experts_per_token(experts: list[Tensor], weights: list[Tensor]) -> list[Tensor]:
    """Several per-token weightings (B, N, E) of the same experts (one per task; the noisy routers' in
    training) -> one (B, N, D) mixture each: eager on the CPU one product (B*N, T, E) @ (B*N, E, D) over the
    experts stacked once, elsewhere multiply-adds (as `mix_experts_per_image`)."""
    if _use_multiply_adds(experts[0]):
        return [mix_by_multiply_adds(experts, w) for w in weights]
    b, n, d = experts[0].shape
    with torch.autocast(experts[0].device.type, enabled=False):
        stacked = torch.stack(experts, dim=2).view(b * n, len(experts), d)
        w = torch.stack(weights, dim=2).to(stacked.dtype).view(b * n, len(weights), -1)  # (B*N, T, E)
        mixed = torch.bmm(w, stacked)  # (B*N, T, D)
    return list(mixed.view(b, n, len(weights), d).unbind(2))


def _use_multiply_adds(x: Tensor) -> bool:
    return x.device.type != "cpu" or torch.compiler.is_compiling()


def mix_by_multiply_adds(experts: list[Tensor], weights: Tensor) -> Tensor:
    """sum_e w_e x_e as E elementwise multiply-adds; weights (B, E) or (B, N, E)."""
    w = weights.to(experts[0].dtype)
    w = (w[:, None] if w.ndim == 2 else w).unsqueeze(-1)  # (B, 1 or N, E, 1): broadcasts over tokens, channels
    mixed = experts[0] * w[:, :, 0]
    for e in range(1, len(experts)):
        mixed = torch.addcmul(mixed, experts[e], w[:, :, e])
    return mixed


class Router(nn.Module):
    """Base: `weights(tas_tokens) -> (B, E), (B, N, E) or None`; forward mixes the experts with them
    (`mix_experts`). A subclass that overrides forward is called as it is; otherwise the student mixes the
    experts of all tasks' routers at a level together (`mix_experts_per_image`)."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts

    def weights(self, tas: Tensor) -> Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, tas: Tensor, experts: list[Tensor]) -> Tensor:
        """tas: (B, N, D) TAS tokens; experts: E tensors (B, N, D) -> mixed (B, N, D)."""
        return mix_experts(experts, self.weights(tas))


@ROUTERS.register("noisy")
class NoisyRouter(Router):
    """SAK's noisy gating: MLP D -> D/2 -> LayerNorm -> GELU -> 2E logits per token, mean-pooled over tokens;
    half are gate logits, half noise scales (softplus + 0.01); softmax over the E experts, no top-k. In
    evaluation one weighting per image, (B, E). In training Gaussian noise is drawn for every token, so the
    weights are per token, (B, N, E): SAK's GlobalRouter expands the pooled logits to the (H, W) grid before
    `randn_like` draws the noise (it was one draw per image here, which shook the whole image's mixture at
    once)."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__(dim, num_experts)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.LayerNorm(dim // 2), nn.GELU(), nn.Linear(dim // 2, 2 * num_experts)
        )

    def weights(self, tas: Tensor) -> Tensor:
        logits = self.mlp(tas).mean(1)  # (B, 2E)
        clean, raw_noise = logits.chunk(2, dim=-1)
        if not self.training:
            return clean.softmax(-1)
        noise = torch.randn(tas.shape[0], tas.shape[1], clean.shape[1], device=clean.device, dtype=clean.dtype)
        return (clean[:, None] + noise * (F.softplus(raw_noise) + 0.01)[:, None]).softmax(-1)  # (B, N, E)


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
