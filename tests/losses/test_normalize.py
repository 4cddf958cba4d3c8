"""Teacher-feature normalisers: standardisation and PHI-S, their statistics, and resume with them."""

import json

import pytest
import torch

from sak.engine import train
from sak.losses.normalize import FeatureNormalizer, TargetNormalizers, hadamard
from sak.teachers import TeacherOutput


def features(seed=0, b=4, c=12, h=5, w=6):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=g) * torch.linspace(0.1, 5, c)  # correlated, very unequal channels
    x = torch.einsum("dc,bchw->bdhw", mix, torch.randn(b, c, h, w, generator=g)) + 3.0
    return x


@pytest.mark.parametrize("d", [1, 2, 12, 20, 48, 384, 768, 1024, 1280])
def test_hadamard_is_orthogonal_with_equal_magnitude_entries(d):
    h = hadamard(d)
    torch.testing.assert_close(h @ h.T, torch.eye(d, dtype=h.dtype))
    torch.testing.assert_close(h.abs(), torch.full_like(h, d**-0.5))


def test_hadamard_unsupported_width_is_a_clear_error():
    with pytest.raises(ValueError, match="no Hadamard matrix construction for width 6"):
        hadamard(6)


def channel_stats(y):
    flat = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).double()
    return flat.mean(0), torch.cov(flat.T, correction=0)


def test_standardize_gives_zero_mean_unit_variance_per_channel():
    x = features()
    norm = FeatureNormalizer(12, "standardize", eps=0.0)
    norm.add(norm.batch_sums(x))
    mean, cov = channel_stats(norm(x))
    torch.testing.assert_close(mean, torch.zeros(12, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(cov.diagonal(), torch.ones(12, dtype=torch.float64), atol=1e-4, rtol=0)


def test_phi_s_centres_and_equalises_every_channel_variance_to_one():
    x = features()
    norm = FeatureNormalizer(12, "phi_s", eps=0.0)
    norm.add(norm.batch_sums(x))
    y = norm(x)
    mean, cov = channel_stats(y)
    torch.testing.assert_close(mean, torch.zeros(12, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(cov.diagonal(), torch.ones(12, dtype=torch.float64), atol=1e-4, rtol=0)
    # an orthogonal map and one scale: total variance is preserved up to that scale
    _, cov_x = channel_stats(x)
    assert cov.trace().item() == pytest.approx(12.0, rel=1e-5)
    assert torch.linalg.eigvalsh(cov).max() / torch.linalg.eigvalsh(cov_x).max() == pytest.approx(
        12 / cov_x.trace().item(), rel=1e-4
    )


def test_statistics_summed_over_shards_equal_one_pass():
    x = features()
    one, two = FeatureNormalizer(12, "phi_s"), FeatureNormalizer(12, "phi_s")
    one.add(one.batch_sums(x))
    two.add(two.batch_sums(x[:2]) + two.batch_sums(x[2:]))  # what the all-reduce "sum" computes
    torch.testing.assert_close(one(x), two(x))


def test_training_with_phi_s_resumes_exactly(tiny_recipe):
    common = ["schedule.max_steps=6", "loss.normalize=phi_s", "teachers.1.options.model_kwargs.embed_dim=48"]
    straight = tiny_recipe(*common, "run.name=a")
    train(straight)
    train(tiny_recipe(*common, "run.name=b", "run.stop_at=3"))
    split = tiny_recipe(*common, "run.name=b")
    train(split)

    def losses(r):
        rows = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
        return {x["step"]: x["loss"] for x in rows if "loss" in x}

    assert losses(straight) == losses(split)
    assert (split.run_dir / "checkpoints" / "step_00000006" / "target_normalizers.safetensors").is_file()


@pytest.mark.parametrize("mode", ["standardize", "phi_s"])
def test_inverse_maps_normalised_features_back(mode):
    x = features()
    norm = FeatureNormalizer(12, mode, eps=0.0)
    norm.add(norm.batch_sums(x))
    torch.testing.assert_close(norm.inverse(norm(x)), x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["standardize", "phi_s"])
def test_one_reduction_for_all_levels_gives_each_level_its_own_sums(mode):
    """update() joins every level's sums into one tensor for one collective and splits the result back:
    a reduction standing in for two processes that saw the same batch equals adding the batch twice."""
    targets = {
        "a": TeacherOutput((features(0, c=12), features(1, c=20)), None),
        "b": TeacherOutput((features(2, c=12),), None),
    }
    dims = {"a": (12, 20), "b": (12,)}
    reduced, twice = TargetNormalizers(dims, mode), TargetNormalizers(dims, mode)
    calls = []
    reduced.update(targets, reduce=lambda t: calls.append(t.shape) or t * 2)
    twice.update(targets)
    twice.update(targets)
    assert len(calls) == 1
    for name in dims:
        for r, t in zip(reduced.norms[name], twice.norms[name], strict=True):
            assert torch.equal(r.count, t.count) and torch.equal(r.sum, t.sum) and torch.equal(r.sum_sq, t.sum_sq)
