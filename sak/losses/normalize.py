"""Teacher-feature normalisation before the distillation loss (`loss.normalize`).

- `none` (SAK): targets as the teachers give them.
- `standardize`: per channel, (x - mean) / std with running statistics (Theia / UNIC style).
- `phi_s`: PHI-S (RADIO): rotate the centred features into their principal axes, mix them with a
  normalised Hadamard matrix so that every channel carries the same variance, and divide by one
  scalar so that variance is 1 (isotropic in scale, invertible, no channel dominates the loss).

Statistics are accumulated over the images seen in training (all processes, summed), in float64 (PHI-S's
outer products taken in float32 on each batch's centred tokens, then widened). The
map is rebuilt from them on a schedule (`loss.normalize_every`, `loss.normalize_until`, see
`normalize_schedule`): `standardize` every step for the whole run; `phi_s` every 100 steps, with the
statistics and the map frozen after 3000 steps, the schedule of RADIO's PHI-S code (an update period of
100 steps and 30 periods of estimation). Rebuilding PHI-S's map every step costs one C x C
eigendecomposition per teacher level per step, and the eigenvectors it gives change sign, and turn
within nearly degenerate parts of the spectrum, from one rebuild to the next: rebuilt every step on real
DINOv2 features, the normalised targets of fixed crops moved by 19-85% a step (relative L2, early to
late in a 3500-step run; benchmarks/results/target_normalizer.md). Each rebuild therefore gives every
eigenvector the sign that agrees with the previous map's (`align_signs`), which cut that to 0.3-30%;
turns within near-degenerate eigenspaces remain. Statistics and map are part of the checkpoint.
Hand-written because no maintained library provides PHI-S.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

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


def normalize_schedule(mode: str, every: int | str = "auto", until: int | str = "auto") -> tuple[int, int | None]:
    """`loss.normalize_every` / `loss.normalize_until` resolved for `mode`: (steps between rebuilding the map,
    step from which the statistics and the map stay fixed, or None for never). `auto`: every step and never for
    `standardize` (running statistics); 100 and 30 x 100 for `phi_s` (RADIO's PHI-S update period and its 30
    periods of estimation)."""
    if every == "auto":
        every = 1 if mode == "standardize" else 100
    if until == "auto":
        until = None if mode == "standardize" else 30 * every
    return every, (None if until == "never" else until)


@contextmanager
def full_float32_products():
    """float32 matrix products at full precision inside: none of the TF32 (or bf16) passes that
    `torch.set_float32_matmul_precision("high")` allows, which keep 10 bits of each factor's mantissa."""
    before = torch.get_float32_matmul_precision()
    if before == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


class FeatureNormalizer(nn.Module):
    """Running statistics of one teacher level's channels and the normalising map last built from them.

    The map (mean, W and for `phi_s` the scale alpha) is a buffer of its own, rebuilt by `refresh()` only: the
    statistics may move on while the map stays as it was, and a checkpoint restores both exactly."""

    def __init__(self, dim: int, mode: str, eps: float = 1e-6, align_signs: bool = True) -> None:
        super().__init__()
        if mode not in ("standardize", "phi_s"):
            raise ValueError(f"loss.normalize: unknown mode {mode!r}; expected none, standardize or phi_s")
        self.mode, self.eps, self.align_signs = mode, eps, align_signs
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("sum", torch.zeros(dim, dtype=torch.float64))
        second = (dim, dim) if mode == "phi_s" else (dim,)
        self.register_buffer("sum_sq", torch.zeros(second, dtype=torch.float64))
        # built once and moved with the module: not rebuilt and copied from the host at every step
        self.register_buffer("hadamard", hadamard(dim) if mode == "phi_s" else None, persistent=False)
        self.register_buffer("map_mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("map_w", torch.zeros(second, dtype=torch.float64))
        self.register_buffer("map_alpha", torch.ones((), dtype=torch.float64))
        # the map of empty statistics, as used before the first update (an evaluation at step 0): what refresh()
        # builds from them, written out rather than found by an eigendecomposition of a zero matrix per level. It
        # keeps the targets' scale (standardize: the identity; phi_s: the bare Hadamard rotation, the zero
        # covariance's eigenvectors being the identity), where dividing by sqrt(eps) made them ~1000x larger
        if mode == "phi_s":
            self.map_w.copy_(self.hadamard)
        else:
            self.map_w.fill_(1.0)

    def batch_sums(self, x: Tensor) -> Tensor:
        """(B, C, h, w) -> one flat float64 vector [n, sum, sum of squares / outer products]."""
        count = x.numel() // x.shape[1]
        if self.mode == "phi_s":
            # The C x C product in float32 on the batch's centred tokens, widened to float64 with the mean's
            # outer product added back: the float64 sums as before, to float32's precision relative to the batch's
            # covariance (not to its mean, which centring takes out first), without float64 matrix products,
            # which run at 1/64 of float32's rate on most GPUs outside the data-centre ones (and half on a CPU)
            flat = x.detach().permute(0, 2, 3, 1).reshape(-1, x.shape[1]).float()  # tokens x channels
            first = flat.sum(0, dtype=torch.float64)
            mean = first / flat.shape[0]
            centred = flat - mean.float()
            with full_float32_products():
                second = (centred.T @ centred).double() + flat.shape[0] * torch.outer(mean, mean)
        else:
            # per channel straight from (B, C, h, w), without the (tokens, C) copy phi_s's product needs: the
            # demo's 12 target levels normalise in 8.7 ms a step on the CPU, 11.4 with it (docs/benchmarks.md)
            wide = x.detach().double()
            first, second = wide.sum((0, 2, 3)), (wide * wide).sum((0, 2, 3))
        # the count made on the device (new_full), not copied from the host: no wait for a GPU
        return torch.cat([first.new_full((1,), count), first, second.flatten()])

    def add(self, sums: Tensor) -> None:
        c = self.sum.numel()
        self.count += sums[0]
        self.sum += sums[1 : 1 + c]
        self.sum_sq += sums[1 + c :].view_as(self.sum_sq)

    @torch.no_grad()
    def refresh(self, align: bool | None = None) -> None:
        """Rebuild the map from the statistics gathered so far (on the device, nothing read back).

        `phi_s`: an eigenvector's sign is arbitrary, and the one LAPACK / cuSOLVER returns can flip with a small
        change of the statistics; through the Hadamard mixing one flip changes every normalised channel. So each
        eigenvector takes the sign that agrees with the same axis of the previous map (the first map's, with the
        identity's), unless `align` (default: the normaliser's `align_signs`) is false."""
        n = self.count.clamp_min(1)
        mean = self.sum / n
        seen = self.count > 0  # (a tensor: no wait for the device) without statistics, the targets' own scale
        if self.mode == "standardize":
            var = (self.sum_sq / n - mean**2).clamp_min(0)
            self.map_w.copy_(torch.where(seen, 1.0 / torch.sqrt(var + self.eps), 1.0))
        else:
            cov = self.sum_sq / n - torch.outer(mean, mean)
            eigval, eigvec = torch.linalg.eigh(cov)  # cov = U diag(L) U^T
            if self.align_signs if align is None else align:
                previous = (self.hadamard.T @ self.map_w * self.map_alpha).T  # the previous map's U
                sign = torch.sign((previous * eigvec).sum(0))
                eigvec = eigvec * torch.where(sign == 0, 1.0, sign)
            # a tensor, not a Python number: reading it would make the host wait for the GPU
            alpha = torch.where(seen, eigval.clamp_min(0).mean().clamp_min(self.eps).sqrt(), 1.0)
            self.map_w.copy_(self.hadamard @ eigvec.T / alpha)  # x' = H U^T (x - mean) / alpha
            self.map_alpha.copy_(alpha)
        self.map_mean.copy_(mean)

    def forward(self, x: Tensor) -> Tensor:
        mean, w = self.map_mean.to(x), self.map_w.to(x)
        if self.mode == "standardize":
            return (x - mean.view(1, -1, 1, 1)) * w.view(1, -1, 1, 1)
        return torch.einsum("dc,bchw->bdhw", w, x - mean.view(1, -1, 1, 1))

    def inverse(self, y: Tensor) -> Tensor:
        """Normalised maps back to the teacher's feature space (held-out comparisons use that space), in float32:
        a bf16 student's maps plus a channel mean far larger than their spread would lose the spread to bf16's
        rounding (the held-out spatial cosine of a perfect student 0.99 where a mean is 30x the spread)."""
        y = y.float()
        mean = self.map_mean.to(y).view(1, -1, 1, 1)
        if self.mode == "standardize":
            return y / self.map_w.to(y).view(1, -1, 1, 1) + mean
        inverse = self.map_w.T * self.map_alpha**2  # H and U are orthogonal: W^-1 = alpha U H^T
        return torch.einsum("cd,bdhw->bchw", inverse.to(y), y) + mean

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        mapped = [prefix + k for k in ("map_mean", "map_w", "map_alpha")]
        if not any(k in state_dict for k in mapped):
            # written before the map was saved, when it was rebuilt from the statistics at every step (with
            # the eigenvectors' signs as LAPACK gave them): rebuilding it so gives the map that run was using
            missing_keys[:] = [k for k in missing_keys if k not in mapped]
            self.refresh(align=False)


class TargetNormalizers(nn.Module):
    """One `FeatureNormalizer` per (teacher, level), updated and rebuilt on one schedule (`normalize_schedule`)."""

    def __init__(
        self,
        level_dims: dict[str, tuple[int, ...]],
        mode: str,
        every: int | str = "auto",
        until: int | str = "auto",
        align_signs: bool = True,
    ) -> None:
        super().__init__()
        self.norms = nn.ModuleDict(
            {
                t: nn.ModuleList(FeatureNormalizer(c, mode, align_signs=align_signs) for c in dims)
                for t, dims in level_dims.items()
            }
        )
        self.every, self.until = normalize_schedule(mode, every, until)

    @torch.no_grad()
    def update(self, targets: dict, step: int, reduce=None, rebuild: bool = True) -> None:
        """Add a batch of teacher outputs, seen at optimiser step `step` (0-based), to the statistics and rebuild
        the maps when the schedule says so: at every step that is a multiple of `every`, and at the last step
        before `until`, after which nothing changes any more. `reduce` sums the batch across processes, once for
        all levels of all teachers (one collective a step rather than one per level). With gradient accumulation
        the trainer passes `rebuild` true for a step's first micro-batch only: one map a step, as without it.

        A batch with a non-finite value anywhere (on any process) adds nothing: its step is skipped as
        non-finite, and its NaN or inf in the sums would make every later map NaN. Decided on the device, without
        reading it back."""
        if not self.collects_at(step):
            return
        pairs = [
            (n, level) for tid, out in targets.items() for n, level in zip(self.norms[tid], out.levels, strict=True)
        ]
        sums = [norm.batch_sums(level) for norm, level in pairs]
        flat = torch.cat(sums)
        if reduce is not None:
            flat = reduce(flat)
        flat = torch.where(torch.isfinite(flat).all(), flat, torch.zeros_like(flat))
        for (norm, _), s in zip(pairs, flat.split([s.numel() for s in sums]), strict=True):
            norm.add(s)
        if rebuild and self.rebuilds_at(step):
            for norm, _ in pairs:
                norm.refresh()

    def collects_at(self, step: int) -> bool:
        """Whether step `step` still adds to the statistics (before `until`)."""
        return self.until is None or step < self.until

    def rebuilds_at(self, step: int) -> bool:
        """Whether `update` at step `step` rebuilds the maps: a multiple of `every`, or the last step before
        `until`, and not after it."""
        return self.collects_at(step) and (step % self.every == 0 or step + 1 == self.until)

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
