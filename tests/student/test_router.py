"""The mixture-of-representations routers: weights, noise, and the mixing products on every device."""

import pytest
import torch

from sak.student.router import (
    NoisyRouter,
    PixelRouter,
    SumRouter,
    _use_multiply_adds,
    mix_experts,
    mix_experts_per_image,
    mix_experts_per_token,
)


def experts(b=2, n=5, d=8, e=3):
    torch.manual_seed(0)
    return torch.randn(b, n, d), [torch.randn(b, n, d) for _ in range(e)]


def test_noisy_router_weights_sum_to_one_with_noise_only_in_training():
    tas, ex = experts()
    router = NoisyRouter(8, 3)
    router.eval()
    w1, w2 = router.weights(tas), router.weights(tas)
    assert w1.shape == (2, 3)
    torch.testing.assert_close(w1.sum(-1), torch.ones(2))
    torch.testing.assert_close(w1, w2)  # eval: deterministic
    router.train()
    t1, t2 = router.weights(tas), router.weights(tas)
    torch.testing.assert_close(t1.sum(-1), torch.ones(2, 5))
    assert not torch.allclose(t1, t2)  # training: noisy
    # noise per token, as SAK's (its pooled logits expanded to the grid, then randn_like): it was per image
    assert t1.shape == (2, 5, 3) and not torch.allclose(t1[:, :1].expand_as(t1), t1)
    mixed = router.eval()(tas, ex)
    expected = sum(w1[:, i, None, None] * ex[i] for i in range(3))
    torch.testing.assert_close(mixed, expected)


def test_none_router_is_the_plain_sum_and_pixel_router_weights_each_token():
    tas, ex = experts()
    torch.testing.assert_close(SumRouter(8, 3)(tas, ex), ex[0] + ex[1] + ex[2])
    w = PixelRouter(8, 3).weights(tas)
    assert w.shape == (2, 5, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 5))


@pytest.mark.parametrize("router_cls", [NoisyRouter, PixelRouter])
def test_router_mixing_and_its_gradients_equal_the_weighted_sum_written_out(router_cls):
    """The routers mix with one batched product; in float64 it equals sum_e w_e * x_e, forward and backward,
    and under autocast it stays in the experts' dtype."""
    tas, ex = experts()
    router = router_cls(8, 3).double().eval()
    tas, ex = tas.double().requires_grad_(True), [e.double().requires_grad_(True) for e in ex]

    def written_out():
        w = router.weights(tas)
        w = w[:, None, :] if w.ndim == 2 else w
        return sum(w[..., i, None] * ex[i] for i in range(3))

    g = torch.randn(2, 5, 8, dtype=torch.float64)
    inputs = [tas, *ex, *router.parameters()]
    got, want = router(tas, ex), written_out()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert router.float()(tas.float(), [e.float() for e in ex]).dtype == torch.float32


@pytest.mark.parametrize("per_token", [False, True])
def test_multiply_add_mixing_of_accelerators_and_compiled_students_equals_the_batched_product(monkeypatch, per_token):
    """Off the CPU, or traced by torch.compile, the experts are mixed by elementwise multiply-adds instead of
    the batched product (whose inner dimension of E = 4 cuBLAS runs slowly): the same mixtures and gradients
    in float64, per-image weights for several tasks at once and per-token weights, and no product taken."""
    _, ex = experts(e=4)
    ex = [e.double().requires_grad_(True) for e in ex]
    shape = (2, 5, 4) if per_token else (2, 4)
    ws = [torch.randn(shape, dtype=torch.float64).softmax(-1).requires_grad_(True) for _ in range(3)]

    def mix():
        return [mix_experts(ex, w) for w in ws] if per_token else mix_experts_per_image(ex, ws)

    def mix_tokens():  # several tasks' per-token weights at once (the noisy routers' in training)
        return mix_experts_per_token(ex, ws)

    products = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: products.append(1) or bmm(*a))
    want = mix()  # eager on the CPU: the batched product
    assert products and not _use_multiply_adds(ex[0]) and _use_multiply_adds(torch.empty(0, device="meta"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch, "bmm", lambda *a: pytest.fail("the batched product was taken"))
    got = mix()
    grads = [torch.randn_like(m) for m in got]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad(got, ex + ws, grads)
    for a, b in zip(got_grads, torch.autograd.grad(want, ex + ws, grads), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mix_experts([e.detach().float() for e in ex], ws[0].detach().float()).dtype == torch.float32
    if per_token:  # the tasks together: the same mixtures and gradients, by one product or multiply-adds
        monkeypatch.undo()
        eager = mix_tokens()
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        for together in (eager, mix_tokens()):
            for a, b in zip(together, want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            for a, b in zip(torch.autograd.grad(together, ex + ws, grads), got_grads, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixing_on_cuda_takes_multiply_adds_and_equals_the_cpus_product(monkeypatch):
    """On a CUDA device the student mixes by multiply-adds: the CPU's batched product's mixtures and
    gradients, in float32, per-image weights of several tasks and per-token weights."""
    _, ex = experts(b=2, n=7, d=16, e=4)
    ws = [torch.randn(2, 4).softmax(-1) for _ in range(3)] + [torch.randn(2, 7, 4).softmax(-1)]

    def run(device):
        xs = [e.to(device).requires_grad_(True) for e in ex]
        mixed = mix_experts_per_image(xs, [w.to(device) for w in ws[:3]]) + [mix_experts(xs, ws[3].to(device))]
        mixed += mix_experts_per_token(xs, [ws[3].to(device), ws[3].flip(1).to(device)])
        grads = torch.autograd.grad(mixed, xs, [torch.ones_like(m) for m in mixed])
        return [m.detach().cpu() for m in mixed], [g.cpu() for g in grads]

    want = sum(run("cpu"), [])
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda x, *a: pytest.fail("product on CUDA") if x.is_cuda else bmm(x, *a))
    for a, b in zip(sum(run("cuda"), []), want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
