"""Teacher-feature normalisation before the distillation loss (`loss.normalize`).

- `none` (SAK): targets as the teachers give them.
- `standardize`: per channel, (x - mean) / std with running statistics (Theia / UNIC style).
- `phi_s`: PHI-S (RADIO): rotate the centred features into their principal axes, mix them with a
  normalised Hadamard matrix so that every channel carries the same variance, and divide by one
  scalar so that variance is 1 (isotropic in scale, invertible, no channel dominates the loss).

Statistics are accumulated over every image seen in training (all processes, summed), in float64,
and are part of the checkpoint. Hand-written because no maintained library provides PHI-S.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, int(math.isqrt(n)) + 1))


def _paley(q: int) -> Tensor:
    """Hadamard matrix of order q + 1 for a prime q = 3 (mod 4) (Paley construction I)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in residues else -1 for i in range(1, q)]
    jac = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac
    return s + torch.eye(q + 1, dtype=torch.float64)


def hadamard(d: int) -> Tensor:
    """A d x d matrix H with entries +-1 / sqrt(d) and H H^T = I, for d = 2^j * (q + 1) with q = 0 or
    a prime = 3 (mod 4): Sylvester doubling of a Paley core (384, 768, 1024, 1280, 1536, ...)."""
    k, odd = 0, d
    while odd % 2 == 0:
        odd, k = odd // 2, k + 1
    core = None
    if odd == 1:
        core = torch.ones(1, 1, dtype=torch.float64)
    else:
        for j in range(1, k + 1):  # core order odd * 2^j = q + 1, the rest by doubling
            q = odd * 2**j - 1
            if _is_prime(q) and q % 4 == 3:
                core, k = _paley(q), k - j
                break
    if core is None:
        raise ValueError(
            f"loss.normalize=phi_s: no Hadamard matrix construction for width {d}; supported widths are "
            "2^j * (q + 1) with q = 0 or a prime = 3 (mod 4), e.g. 384, 768, 1024, 1280, 1536"
        )
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for _ in range(k):
        core = torch.kron(core, h2)
    return core / math.sqrt(d)


class FeatureNormalizer(nn.Module):
    """Running statistics of one teacher level's channels and the normalising map built from them."""

    def __init__(self, dim: int, mode: str, eps: float = 1e-6) -> None:
        super().__init__()
        if mode not in ("standardize", "phi_s"):
            raise ValueError(f"loss.normalize: unknown mode {mode!r}; expected none, standardize or phi_s")
        self.mode, self.eps = mode, eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("sum", torch.zeros(dim, dtype=torch.float64))
        second = (dim, dim) if mode == "phi_s" else (dim,)
        self.register_buffer("sum_sq", torch.zeros(second, dtype=torch.float64))
        # built once and moved with the module: not rebuilt and copied from the host at every step
        self.register_buffer("hadamard", hadamard(dim) if mode == "phi_s" else None, persistent=False)
        self._cached: tuple[Tensor, Tensor, Tensor] | None = None  # (mean, W, W^-1) for the current statistics

    def batch_sums(self, x: Tensor) -> Tensor:
        """(B, C, h, w) -> one flat float64 vector [n, sum, sum of squares / outer products]."""
        flat = x.detach().permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()
        second = flat.T @ flat if self.mode == "phi_s" else (flat * flat).sum(0)
        # the count made on the device (new_full), not copied from the host: no wait for a GPU
        return torch.cat([flat.new_full((1,), flat.shape[0]), flat.sum(0), second.flatten()])

    def add(self, sums: Tensor) -> None:
        c = self.sum.numel()
        self.count += sums[0]
        self.sum += sums[1 : 1 + c]
        self.sum_sq += sums[1 + c :].view_as(self.sum_sq)
        self._cached = None

    def _transform(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._cached is None:
            n = self.count.clamp_min(1)
            mean = self.sum / n
            if self.mode == "standardize":
                var = (self.sum_sq / n - mean**2).clamp_min(0)
                w = 1.0 / torch.sqrt(var + self.eps)
                inverse = 1.0 / w
            else:
                cov = self.sum_sq / n - torch.outer(mean, mean)
                eigval, eigvec = torch.linalg.eigh(cov)  # cov = U diag(L) U^T
                # a tensor, not a Python number: reading it would make the host wait for the GPU every step
                alpha = eigval.clamp_min(0).mean().clamp_min(self.eps).sqrt()
                w = self.hadamard @ eigvec.T / alpha  # x' = H U^T (x - mean) / alpha
                inverse = w.T * alpha**2  # H and U are orthogonal: W^-1 = alpha U H^T
            self._cached = (mean, w, inverse)
        return self._cached

    def forward(self, x: Tensor) -> Tensor:
        mean, w, _ = (t.to(x) for t in self._transform())
        if self.mode == "standardize":
            return (x - mean.view(1, -1, 1, 1)) * w.view(1, -1, 1, 1)
        return torch.einsum("dc,bchw->bdhw", w, x - mean.view(1, -1, 1, 1))

    def inverse(self, y: Tensor) -> Tensor:
        """Normalised maps back to the teacher's feature space (held-out comparisons use that space)."""
        mean, _, inv = (t.to(y) for t in self._transform())
        if self.mode == "standardize":
            return y * inv.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)
        return torch.einsum("cd,bdhw->bchw", inv, y) + mean.view(1, -1, 1, 1)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._cached = None
        super()._load_from_state_dict(*args, **kwargs)


class TargetNormalizers(nn.Module):
    """One `FeatureNormalizer` per (teacher, level)."""

    def __init__(self, level_dims: dict[str, tuple[int, ...]], mode: str) -> None:
        super().__init__()
        self.norms = nn.ModuleDict(
            {t: nn.ModuleList(FeatureNormalizer(c, mode) for c in dims) for t, dims in level_dims.items()}
        )

    @torch.no_grad()
    def update(self, targets: dict, reduce=None) -> None:
        """Add a batch of teacher outputs to the statistics; `reduce` sums the batch across processes, once
        for all levels of all teachers (one collective a step rather than one per level)."""
        pairs = [
            (n, level) for tid, out in targets.items() for n, level in zip(self.norms[tid], out.levels, strict=True)
        ]
        sums = [norm.batch_sums(level) for norm, level in pairs]
        if reduce is not None:
            sums = reduce(torch.cat(sums)).split([s.numel() for s in sums])
        for (norm, _), s in zip(pairs, sums, strict=True):
            norm.add(s)

    def denormalize(self, features: dict[str, list[Tensor]]) -> dict[str, list[Tensor]]:
        """Student features (predicting normalised targets) mapped back to each teacher's space."""
        return {
            tid: [n.inverse(f) for n, f in zip(self.norms[tid], levels, strict=True)]
            for tid, levels in features.items()
        }

    def forward(self, targets: dict) -> dict:
        from ..teachers import TeacherOutput

        return {
            tid: TeacherOutput(
                tuple(n(level) for n, level in zip(self.norms[tid], out.levels, strict=True)), out.summary
            )
            for tid, out in targets.items()
        }
