"""The decode heads upsample their bf16 projections in bf16 (sak/student/heads.py): the same values as CUDA
autocast's float32 upsampling cast back to bf16, and the same float32 backward."""

import pytest
import torch
import torch.nn.functional as F

from sak.student.heads import DecodeHead, _UpsampleKeepingDtype


def autocast_way(x, size):
    """What CUDA autocast does: upsample in float32; the convolution then casts to the input's dtype."""
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False).to(x.dtype)


def check_bit_for_bit(device: str, dtype: torch.dtype, channels_last: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 8, device=device).to(dtype)
    if channels_last:  # the heads' projections come out channels-last (a transposed token matrix)
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 6, 32, 32, device=device).to(dtype)
    outs, grads = [], []
    for fn in (autocast_way, _UpsampleKeepingDtype.apply):
        leaf = x.detach().requires_grad_(True)
        out = fn(leaf, (32, 32))
        out.backward(g)
        outs.append(out)
        grads.append(leaf.grad)
    assert outs[1].dtype == dtype and grads[1].dtype == dtype
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsampling_keeps_the_dtype_and_equals_float32_upsampling_bit_for_bit(dtype, channels_last):
    check_bit_for_bit("cpu", dtype, channels_last)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsampling_on_cuda_equals_float32_upsampling_bit_for_bit(dtype, channels_last):
    check_bit_for_bit("cuda", dtype, channels_last)


def test_head_in_float64_is_the_plain_function_and_under_autocast_stays_close():
    torch.manual_seed(0)
    head = DecodeHead(16, 2, 3).double()
    levels = [torch.randn(2, 16, 16, dtype=torch.float64, requires_grad=True) for _ in range(2)]  # 4 x 4 grids
    out = head(levels, (4, 4), (32, 32))

    def written_out(levels):
        maps = [
            F.interpolate(p(t).transpose(1, 2).unflatten(2, (4, 4)), size=(8, 8), mode="bilinear", align_corners=False)
            for p, t in zip(head.proj, levels, strict=True)
        ]
        x = head.classifier(head.fuse(torch.cat(maps, dim=1)))
        return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)

    g = torch.randn_like(out)
    torch.testing.assert_close(out, written_out(levels), rtol=1e-12, atol=1e-12)
    for a, b in zip(
        torch.autograd.grad(out, levels, g), torch.autograd.grad(written_out(levels), levels, g), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = head.float()([t.detach().float() for t in levels], (4, 4), (32, 32))
    torch.testing.assert_close(low.double(), out.detach(), rtol=0.05, atol=0.05)
