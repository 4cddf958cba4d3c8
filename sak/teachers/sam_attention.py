"""SAM's attention with its decomposed relative-position bias, run by PyTorch's fused attention kernels.

SAM adds to every attention logit a bias that is the query's dot product with a learnt table for the
key's row offset plus one for its column offset (MViTv2's decomposed relative positions):

    logit(q, k) = scale * <q, k> + <q, Rh[row(q), row(k)]> + <q, Rw[col(q), col(k)]>

segment_anything computes the full (N x N) attention matrix by hand; timm passes the bias as a dense
(B * heads, N, N) mask to `scaled_dot_product_attention` with 3-D inputs, which only the unfused "math"
kernel accepts. At 1024 px (a 64 x 64 grid) that is 16.7M logits per head, materialised: on an H100 the
SAM-B encoder ran at 32 TFLOP/s and took 82% of a stage-1 step (benchmarks/results/throughput_gpu_2026-11-22.md).

The bias is itself a dot product, so it folds into the attention's own: with
    q' = [q, <q, Rh[row(q), :]> / scale, <q, Rw[col(q), :]> / scale]      (c + H + W features)
    k' = [k, onehot(row(k)), onehot(col(k))]
we have scale * <q', k'> = logit(q, k) exactly, and attention over (q', k', v) with the same scale is SAM's
attention with no mask, which the flash / memory-efficient kernels take. On the CPU v is zero-padded to the
same width and the padding sliced off the output; on a CUDA device it is passed at its own width (below).
(No library does this for both SAM implementations; hence this file.)

The price is width: at 1024 px the global blocks' heads grow from c = 64 to 64 + 64 + 64 = 192 (v too, where it
is padded, as the flash kernel wants equal widths), so their attention does up to 3x the multiply-adds SAM
defines; with v padded SAM-B's attention executes 10.5 of its 22.2 TFLOP per forward at batch 16
(benchmarks/results/step_traffic.md, whose main table counts the CPU's padded v). v at 64 channels takes
another fused kernel with a third fewer products, which on an H200 was the faster
(benchmarks/results/sam_attention_cuda.md). The other kernel, `rel_pos_flex_attention`, keeps c: PyTorch's
FlexAttention compiles a kernel whose score modification adds the two bias terms, gathered from
(B, heads, N, H) and (B, heads, N, W) tables, to each logit; on that H200 (torch 2.11) it was 10x slower
than the folded kernel. The teacher option `attention: folded | flex | library` chooses.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rel_pos_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rh: Tensor,
    rw: Tensor,
    size: tuple[int, int],
    scale: float,
    narrow_v: bool | None = None,
) -> Tensor:
    """q, k, v (B, heads, H*W, c); rh (H, H, c), rw (W, W, c) the tables for (query, key) offsets -> (B, heads, N, c).

    The widened q', k', v' are written straight into one buffer each, zero columns included: at 1024 px this
    moves half the bytes of concatenating and then padding them (benchmarks/results/step_traffic.md). The
    attention's `scale` multiplies <q, k> inside the kernel; the bias terms are divided by it beforehand
    (in the tables, which are small) so that the kernel's scaling gives them back unscaled.

    narrow_v: pass v at its own width c instead of zero-padded to q's. The flash kernel refuses unequal widths,
    but the memory-efficient (and the CPU's) take them, with a third fewer products in the global blocks.
    None (the teacher's choice): on a CUDA device, where it paid on an H200 (SAM-B at 1024 px, batch 16,
    bf16: 3.74 instead of 4.59 ms per global block, 1.35 instead of 1.59 per windowed one), and not on the
    CPU, where it cost more (benchmarks/results/sam_attention_{cuda,cpu}.md)."""
    b, n_heads, n, c = q.shape
    h, w = size
    width = c + h + w
    padded = width + (-width) % 8  # the fused kernels want a head width that is a multiple of 8
    r_q = q.reshape(b, n_heads, h, w, c)
    q2 = q.new_empty(b, n_heads, n, padded)
    k2 = k.new_empty(b, n_heads, n, padded)
    q2[..., :c] = q
    q2[..., c : c + h].view(b, n_heads, h, w, h)[:] = torch.einsum("bnhwc,hkc->bnhwk", r_q, (rh / scale).to(q.dtype))
    q2[..., c + h : width].view(b, n_heads, h, w, w)[:] = torch.einsum(
        "bnhwc,wkc->bnhwk", r_q, (rw / scale).to(q.dtype)
    )
    k2[..., :c] = k
    index = torch.arange(n, device=q.device)
    k2[..., c : c + h] = F.one_hot(index // w, h).to(k.dtype)  # broadcast over batch and heads
    k2[..., c + h : width] = F.one_hot(index % w, w).to(k.dtype)
    for t in (q2, k2):
        t[..., width:].zero_()
    if narrow_v is None:  # the teacher's choice: narrow where it paid (CUDA), padded on the CPU
        narrow_v = q.device.type == "cuda"
    if narrow_v:
        return F.scaled_dot_product_attention(q2, k2, v, scale=scale)
    v2 = v.new_empty(b, n_heads, n, padded)
    v2[..., :c] = v
    v2[..., c:].zero_()
    return F.scaled_dot_product_attention(q2, k2, v2, scale=scale)[..., :c]


@torch.compiler.disable(recursive=False)  # in a compiled teacher: a graph break, then flex's own compiled kernel
def rel_pos_flex_attention(
    q: Tensor, k: Tensor, v: Tensor, rh: Tensor, rw: Tensor, size: tuple[int, int], scale: float
) -> Tensor:
    """What `rel_pos_attention` computes, at the heads' own width, through FlexAttention (compiled on first use).

    The two bias terms per (query, key row) and (query, key column) are computed beforehand, as SAM computes
    them (an einsum in the inputs' dtype), and the compiled kernel adds them to each logit after the scaling."""
    b, n_heads, n, c = q.shape
    h, w = size
    r_q = q.reshape(b, n_heads, h, w, c)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh.to(q.dtype)).reshape(b, n_heads, n, h)
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw.to(q.dtype)).reshape(b, n_heads, n, w)

    def add_bias(score: Tensor, bi: Tensor, hi: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        return score + bias_h[bi, hi, qi, ki // w] + bias_w[bi, hi, qi, ki % w]

    # one compile per (batch, grid) shape: allow more than dynamo's default 8, past which it would run uncompiled
    with torch._dynamo.config.patch(recompile_limit=64):
        return _flex_attention()(q, k, v, score_mod=add_bias, scale=scale)


_compiled_flex: Callable | None = None


def _flex_attention() -> Callable:
    """flex_attention compiled once per process (uncompiled, it would write out the whole score matrix), for
    each shape (a SAM forward has two, windowed and global): with torch 2.14 on the CPU, the kernel that dynamic
    shapes give after a shape changes returned wrong numbers and NaN. It is not traced into a compiled teacher
    (precision.compile_teachers): there, the CPU's inductor refused the bias tables made in the same graph
    ("All the buffers in the score and mask subgraph should be in kernel_group.args.input_buffers")."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


KERNELS = {"folded": rel_pos_attention, "flex": rel_pos_flex_attention}


def _forward(self: nn.Module, x: Tensor, attend: Callable = rel_pos_attention) -> Tensor:
    """Drop-in forward of segment_anything's and timm's SAM `Attention` (input and output (B, H, W, C))."""
    b, h, w, _ = x.shape
    n = h * w
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, c)
    q, k, v = qkv.unbind(0)
    if hasattr(self, "q_norm"):  # timm (Identity for SAM)
        q, k = self.q_norm(q), self.k_norm(k)
    if self.use_rel_pos:
        get_rel_pos = sys.modules[type(self).__module__].get_rel_pos  # each library's own (interpolates tables)
        out = attend(q, k, v, get_rel_pos(h, h, self.rel_pos_h), get_rel_pos(w, w, self.rel_pos_w), (h, w), self.scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
    x = out.transpose(1, 2).reshape(b, h, w, -1)
    x = self.proj(x)
    return self.proj_drop(x) if hasattr(self, "proj_drop") else x


def fuse_sam_attention(model: nn.Module, kernel: str = "folded") -> int:
    """Give every SAM attention module in `model` the forward that runs `kernel` ("folded": the bias folded
    into the dot product, PyTorch's fused attention; "flex": FlexAttention); returns how many were changed."""
    if kernel not in KERNELS:
        raise ValueError(f"SAM attention kernel {kernel!r}: choose one of {sorted(KERNELS)}")
    attend = KERNELS[kernel]

    def forward(self: nn.Module, x: Tensor) -> Tensor:  # a function, not a functools.partial: dynamo traces it
        return _forward(self, x, attend)

    count = 0
    for module in model.modules():
        sam_like = type(module).__name__ == "Attention" and hasattr(module, "use_rel_pos") and hasattr(module, "qkv")
        if sam_like and getattr(module, "rope", None) is None:  # (timm's rotary-embedding variants are not SAM's)
            module.forward = types.MethodType(forward, module)
            count += 1
    return count
