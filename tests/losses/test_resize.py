"""The matrix-product bilinear resize and the flattened cosine equal the PyTorch ops they replace."""

import pytest
import torch
import torch.nn.functional as F

from sak.losses.distill import SAKDistill, flat_cosine, map_cosine, match_size, upsampled_cosine
from sak.losses.resize import gram_matrix, interpolation_matrix, resize_bilinear, resize_bilinear_adjoint

SIZES = [((2, 3, 4, 4), (7, 7)), ((2, 5, 8, 6), (56, 40)), ((1, 2, 24, 24), (64, 64)), ((2, 3, 6, 9), (11, 5))]


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((2, 3, 4, 4), (7, 7)),
        ((2, 5, 8, 6), (56, 40)),
        ((1, 2, 24, 24), (64, 64)),
        ((2, 3, 14, 10), (7, 9)),
        ((1, 1, 5, 5), (5, 11)),
        ((3, 1, 9, 4), (2, 4)),
    ],
)
def test_resize_equals_f_interpolate_and_its_gradient(shape, size):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    ref = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    out = resize_bilinear(x, size)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    (gr,) = torch.autograd.grad(ref, x, g)
    (go,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(go, gr, rtol=1e-12, atol=1e-12)


def test_resize_float32_channels_last_input_and_autocast_do_not_change_it():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    ref = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loss is float32 even if a caller leaves autocast on
        out = resize_bilinear(x, (20, 20))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_same_size_is_returned_as_is_and_matrices_are_cached():
    x = torch.randn(1, 2, 3, 4)
    assert resize_bilinear(x, (3, 4)) is x
    a = interpolation_matrix(3, 8, torch.device("cpu"), torch.float32)
    assert a is interpolation_matrix(3, 8, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(a.sum(1), torch.ones(8))  # each output mixes its inputs with weights summing to 1


def test_a_matrix_first_made_under_inference_mode_still_trains():
    # evaluation (inference_mode) may be the first to ask for a size; training steps reuse the cached matrix
    with torch.inference_mode():
        resize_bilinear(torch.randn(1, 2, 13, 13), (31, 29))
    x = torch.randn(1, 2, 13, 13, requires_grad=True)
    resize_bilinear(x, (31, 29)).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_match_size_resizes_like_f_interpolate_both_ways():
    torch.manual_seed(0)
    small, big = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 16, 16)
    a, b = match_size(small, big)
    torch.testing.assert_close(a, F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False))
    a, b = match_size(big, small)
    torch.testing.assert_close(b, F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False))


def test_flat_cosine_equals_f_cosine_similarity_including_a_zero_map():
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 6, 6, dtype=torch.float64), torch.randn(3, 4, 6, 6, dtype=torch.float64)
    s[1] = 0  # zero norm: both clamp it to eps and give 0
    ref = F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)
    torch.testing.assert_close(flat_cosine(s, t), ref, rtol=1e-12, atol=1e-12)
    assert flat_cosine(s, t)[1].item() == 0.0


@pytest.mark.parametrize(("shape", "size"), SIZES)
def test_adjoint_is_the_transpose_and_gram_gives_the_resized_norm(shape, size):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    y = torch.randn(*shape[:2], *size, dtype=torch.float64)
    up = resize_bilinear(x, size)
    small = resize_bilinear_adjoint(y, shape[-2:])
    assert small.shape == x.shape
    torch.testing.assert_close((up * y).sum((2, 3)), (x * small).sum((2, 3)), rtol=1e-12, atol=1e-12)
    gram_h = gram_matrix(shape[-2], size[0], x.device, x.dtype)
    gram_w = gram_matrix(shape[-1], size[1], x.device, x.dtype)
    torch.testing.assert_close(up.square().sum((2, 3)), (x * (gram_h @ x @ gram_w)).sum((2, 3)), rtol=1e-12, atol=0)


@pytest.mark.parametrize(("shape", "size"), SIZES)
def test_upsampled_cosine_and_its_gradient_equal_the_cosine_of_the_upsampled_map(shape, size):
    torch.manual_seed(0)
    s = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    t = torch.randn(*shape[:2], *size, dtype=torch.float64)
    ref = flat_cosine(resize_bilinear(s, size), t)
    out = upsampled_cosine(s, t)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    torch.testing.assert_close(
        torch.autograd.grad(out, s, g)[0], torch.autograd.grad(ref, s, g)[0], rtol=1e-10, atol=1e-12
    )


def test_upsampled_cosine_of_a_zero_map_is_zero_with_a_finite_gradient():
    s = torch.zeros(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 9, 9)
    out = upsampled_cosine(s, t)
    assert out.tolist() == [0.0, 0.0]
    (grad,) = torch.autograd.grad(out.sum(), s)
    assert torch.isfinite(grad).all()


def test_sak_loss_without_its_smooth_l1_term_is_the_cosine_term():
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 5, 5, requires_grad=True), torch.randn(2, 4, 12, 12)
    up = F.interpolate(s, size=(12, 12), mode="bilinear", align_corners=False)
    ref = (1 - F.cosine_similarity(up.flatten(1), t.flatten(1))).mean()
    torch.testing.assert_close(SAKDistill(cos_weight=1.0, l1_weight=0.0)([s], [t]), ref, rtol=1e-6, atol=1e-7)


def test_sak_loss_and_its_gradient_equal_the_reference_formulation():
    """The SAK loss as first written (F.interpolate, F.cosine_similarity) against the fast one (both float32,
    as the loss computes)."""
    torch.manual_seed(0)
    # upsampled 12x (the small-map cosine), same size, downsampled teacher, upsampled 1.4x (full-size cosine)
    levels = [
        ((2, 6, 4, 4), (2, 6, 14, 14)),
        ((2, 5, 4, 4), (2, 5, 4, 4)),
        ((2, 3, 8, 8), (2, 3, 3, 3)),
        ((2, 4, 6, 5), (2, 4, 7, 6)),
    ]
    student = [torch.randn(a, requires_grad=True) for a, _ in levels]
    teacher = [torch.randn(b) for _, b in levels]

    def reference(s_levels, t_levels):
        total = 0
        for s, t in zip(s_levels, t_levels, strict=True):
            if s.shape[-1] < t.shape[-1]:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            elif s.shape[-1] > t.shape[-1]:
                t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
            cos = F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)
            total = total + 0.9 * (1 - cos).mean() + 0.1 * F.smooth_l1_loss(s, t)
        return total

    ref = reference(student, teacher)
    out = SAKDistill()(student, teacher)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    g_ref = torch.autograd.grad(ref, student)
    g_out = torch.autograd.grad(out, student)
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    cos = map_cosine(student[0], teacher[0])
    ref_cos = F.cosine_similarity(
        F.interpolate(student[0].float(), size=(14, 14), mode="bilinear", align_corners=False).flatten(1),
        teacher[0].float().flatten(1),
    )
    torch.testing.assert_close(cos, ref_cos, rtol=1e-5, atol=1e-6)


def test_sak_loss_takes_the_cosine_at_the_students_size_only_for_much_larger_teacher_grids(monkeypatch):
    import sak.losses.distill as distill

    calls = []
    monkeypatch.setattr(distill, "upsampled_cosine", lambda s, t: calls.append(t.shape[-2:]) or flat_cosine(s, s))
    loss = SAKDistill()
    student = torch.randn(2, 3, 6, 6)
    for size in (7, 11, 12, 30):  # 1.4x, 3.4x, 4x and 25x the student's pixels
        loss([student], [torch.randn(2, 3, size, size)])
    assert calls == [(12, 12), (30, 30)]


def test_the_spatial_cosine_counts_structure_not_the_mean_feature():
    """The held-out cosine of features with a large common mean is high for a student that predicts that mean
    alone: the spatial one takes each map's per-channel mean over the image away first."""
    torch.manual_seed(0)
    structure = torch.randn(2, 8, 4, 5)
    teacher = structure + 10 * torch.randn(1, 8, 1, 1)  # a large mean feature, the same in every image
    mean_only = teacher.mean((2, 3), keepdim=True).expand_as(teacher)
    assert (map_cosine(mean_only, teacher) > 0.95).all()  # (the plain cosine: almost perfect)
    assert (map_cosine(mean_only, teacher, spatial=True).abs() < 1e-4).all()
    shifted = structure + 3.0  # the structure right, another mean
    torch.testing.assert_close(map_cosine(shifted, teacher, spatial=True), torch.ones(2))
