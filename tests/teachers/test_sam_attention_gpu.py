"""SAM's folded relative-position attention on a CUDA device (gpu-marked; no segment_anything import, so that
it runs where that package is not installed)."""

import pytest
import torch
import torch.nn.functional as F

from sak.teachers.sam_attention import rel_pos_attention


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rel_pos_attention_on_cuda_leaves_v_narrow_and_equals_the_bias_written_out(dtype, monkeypatch):
    """On a CUDA device the folded attention passes v at its own width by default (another fused kernel than
    the flash one): the same function as SAM's formula, written out in float64 on the CPU, to the dtype's
    precision, and as the padded variant on the same device."""
    (h, w), c, scale = (14, 14), 64, 64**-0.5
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, h * w, c, generator=gen, dtype=torch.float64) for _ in range(3))
    rh, rw = (torch.randn(n, n, c, generator=gen, dtype=torch.float64) * 0.1 for n in (h, w))
    row, col = torch.arange(h * w) // w, torch.arange(h * w) % w
    bias = torch.einsum("bnqc,qkc->bnqk", q, rh[row][:, row]) + torch.einsum("bnqc,qkc->bnqk", q, rw[col][:, col])
    expected = torch.softmax(scale * q @ k.transpose(-1, -2) + bias, dim=-1) @ v
    on_gpu = [t.to("cuda", dtype) for t in (q, k, v, rh, rw)]
    widths = []  # of v, as the fused kernel receives it
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda q, k, v, **kw: widths.append(v.shape[-1]) or sdpa(q, k, v, **kw)
    )
    narrow = rel_pos_attention(*on_gpu, (h, w), scale)
    padded = rel_pos_attention(*on_gpu, (h, w), scale, narrow_v=False)
    assert widths[0] == c < widths[1]  # the default on CUDA: v left c wide
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(narrow.double().cpu(), expected, **tol)
    torch.testing.assert_close(narrow, padded, **tol)
