"""Bilinear resizing as two small matrix products.

`F.interpolate(x, size, mode="bilinear", align_corners=False)` (no antialias) is separable: each output
row mixes at most two input rows with fixed weights, and the same along columns, so it equals
`A_h @ x @ A_w^T` with A_h (H, h) and A_w (W, w) the 1-D interpolation matrices. Written that way, forward
and backward are dense matrix products. PyTorch's own kernel is an elementwise gather and its backward a
scatter (atomic adds on CUDA); on the distillation losses, which upsample every student map to the
teacher's grid (SAM's 64 x 64) and back-propagate through it, the products are several times faster on CPU
(benchmarks/results/distill_loss_cpu.md). The matrices are PyTorch's own weights: they are made by interpolating an identity
matrix with F.interpolate, so both ways compute the same linear map; they differ only in float rounding
(about 1e-7 relative in float32).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def _weights(n_in: int, n_out: int, device: torch.device, exact: torch.dtype) -> Tensor:
    """(n_out, n_in) 1-D bilinear weights made on `device` in `exact` precision (float32 or float64)."""
    eye = torch.eye(n_in, dtype=exact, device=device).reshape(n_in, 1, n_in, 1)  # row j = the j-th unit signal
    columns = F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)  # (n_in, 1, n_out, 1)
    return columns[:, 0, :, 0].T.contiguous()


def _exact(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32  # the precision F.interpolate's weights use


def _wide(device: torch.device) -> torch.dtype:  # the Gram product's precision (MPS has no float64)
    return torch.float32 if device.type == "mps" else torch.float64


@functools.lru_cache(maxsize=64)
def _cached_interpolation_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    # a plain tensor even when first asked for under inference_mode (evaluation): the cached matrix is
    # reused by training steps, and autograd refuses to save an inference tensor for backward
    with torch.inference_mode(False), torch.no_grad():
        return _weights(n_in, n_out, torch.device("cpu"), _exact(dtype)).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _cached_gram_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    with torch.inference_mode(False), torch.no_grad():
        a = _weights(n_in, n_out, torch.device("cpu"), _exact(dtype)).double()
        return (a.T @ a).to(device=device, dtype=dtype)


def interpolation_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n_out, n_in) weights of 1-D bilinear resizing (align_corners=False), as F.interpolate computes them:
    made on the CPU once per (sizes, device, dtype) and cached. Traced by torch.compile
    (`precision.compile_losses`) they are made inside the graph, on the device: dynamo cannot keep a
    cache, and a matrix made on the CPU would cross to the device on every call."""
    if torch.compiler.is_compiling():
        return _weights(n_in, n_out, device, _exact(dtype)).to(dtype)
    return _cached_interpolation_matrix(n_in, n_out, device, dtype)


def gram_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n_in, n_in) A^T A of the float32 (or float64) interpolation matrix A = interpolation_matrix(n_in,
    n_out): |resize(x)|^2 = <x, G_h x G_w>. The product is taken in float64 (float32 on MPS, traced), then
    cast; cached, or made in the graph, as interpolation_matrix."""
    if torch.compiler.is_compiling():
        a = _weights(n_in, n_out, device, _exact(dtype)).to(_wide(device))
        return (a.T @ a).to(dtype)
    return _cached_gram_matrix(n_in, n_out, device, dtype)


interpolation_matrix.cache_clear = _cached_interpolation_matrix.cache_clear  # type: ignore[attr-defined]
gram_matrix.cache_clear = _cached_gram_matrix.cache_clear  # type: ignore[attr-defined]


def resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(..., h, w) -> (..., H, W), equal to F.interpolate(x, size, mode="bilinear", align_corners=False)
    up to float rounding; contiguous output; differentiable. Runs in x's dtype whatever autocast says
    (TF32, when a user enables it for float32 matmuls, applies here as to any product)."""
    h, w = x.shape[-2:]
    H, W = size
    if (h, w) == (H, W):
        return x
    with torch.autocast(x.device.type, enabled=False):
        if w != W:
            x = torch.matmul(x, interpolation_matrix(w, W, x.device, x.dtype).T)
        if h != H:
            x = torch.matmul(interpolation_matrix(h, H, x.device, x.dtype), x)
    return x


def resize_bilinear_adjoint(y: Tensor, size: tuple[int, int]) -> Tensor:
    """(..., H, W) -> (..., h, w): the transpose of resize_bilinear's linear map from (h, w) to (H, W), so
    that <resize_bilinear(x, (H, W)), y> == <x, resize_bilinear_adjoint(y, (h, w))> up to float rounding.
    (It is not a downsampling: each input pixel receives the weights it was spread with.)"""
    H, W = y.shape[-2:]
    h, w = size
    with torch.autocast(y.device.type, enabled=False):
        if w != W:
            y = torch.matmul(y, interpolation_matrix(w, W, y.device, y.dtype))
        if h != H:
            y = torch.matmul(interpolation_matrix(h, H, y.device, y.dtype).T, y)
    return y
