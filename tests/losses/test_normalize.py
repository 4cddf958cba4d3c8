"""Teacher-feature normalisers: standardisation and PHI-S, their statistics, and resume with them."""

import json

import pytest
import torch

from sak.engine import train
from sak.losses.normalize import FeatureNormalizer, TargetNormalizers, hadamard, normalize_schedule
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
    norm.refresh()
    mean, cov = channel_stats(norm(x))
    torch.testing.assert_close(mean, torch.zeros(12, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(cov.diagonal(), torch.ones(12, dtype=torch.float64), atol=1e-4, rtol=0)


def test_phi_s_centres_and_equalises_every_channel_variance_to_one():
    x = features()
    norm = FeatureNormalizer(12, "phi_s", eps=0.0)
    norm.add(norm.batch_sums(x))
    norm.refresh()
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
    one.refresh(), two.refresh()
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


def test_a_stage_2_run_starts_from_its_init_from_runs_target_statistics(tiny_recipe, capsys):
    """Its aligners learnt to predict targets under stage 1's map: stage 2 used to gather the statistics afresh,
    so its first steps' targets were in another basis. A source of another mode, or without statistics, is
    said and gathered afresh."""
    from safetensors.torch import load_file

    from sak.engine.checkpoint import latest_checkpoint

    common = ["schedule.max_steps=3", "teachers.1.options.model_kwargs.embed_dim=48"]
    stage1 = tiny_recipe(*common, "run.name=s1", "loss.normalize=phi_s")
    train(stage1)

    def counts(r):
        state = load_file(str(latest_checkpoint(r.run_dir / "checkpoints") / "target_normalizers.safetensors"))
        return {k: v.item() for k, v in state.items() if k.endswith(".count")}

    capsys.readouterr()
    stage2 = tiny_recipe(*common, "run.name=s2", "loss.normalize=phi_s", f"checkpoint.init_from={stage1.run_dir}")
    train(stage2)
    assert (
        "target_normalizers.safetensors' (checkpoint.init_from): the normalising maps go on" in capsys.readouterr().out
    )
    assert counts(stage2) == {k: 2 * v for k, v in counts(stage1).items()}  # stage 1's 3 steps, then its own 3

    other = tiny_recipe(*common, "run.name=s3", "loss.normalize=standardize", f"checkpoint.init_from={stage1.run_dir}")
    train(other)
    assert "do not fit this recipe's loss.normalize (size mismatch for norms.vit_a.0.sum_sq" in capsys.readouterr().out
    assert counts(other) == counts(stage1)  # 3 steps of its own only
    train(none := tiny_recipe(*common, "run.name=s4", "loss.normalize=none"))
    train(tiny_recipe(*common, "run.name=s5", "loss.normalize=phi_s", f"checkpoint.init_from={none.run_dir}"))
    assert "holds no target statistics (its run had loss.normalize none): they are gathered" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["standardize", "phi_s"])
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_new_normaliser_holds_the_map_refresh_builds_from_empty_statistics(mode, eps):
    """The map before the first update is written out at construction, not found by an eigendecomposition:
    it must be the one refresh() builds from the empty statistics, bit for bit."""
    norm = FeatureNormalizer(12, mode, eps=eps)
    built = {k: v.clone() for k, v in norm.state_dict().items()}
    norm.refresh()
    for k, v in norm.state_dict().items():
        assert torch.equal(v, built[k]), k


@pytest.mark.parametrize("mode", ["standardize", "phi_s"])
def test_the_map_before_any_statistics_keeps_the_targets_scale(mode):
    """An evaluation at step 0 (eval.at_start) normalises with the map of empty statistics: it was 1 / sqrt(eps),
    targets ~1000x larger and a distillation loss ~170x the one after the first update."""
    x = features()
    y = FeatureNormalizer(12, mode)(x)
    if mode == "standardize":
        assert torch.equal(y, x)
    else:  # a rotation: each token's norm kept
        torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["standardize", "phi_s"])
def test_inverse_maps_normalised_features_back(mode):
    x = features()
    norm = FeatureNormalizer(12, mode, eps=0.0)
    norm.add(norm.batch_sums(x))
    norm.refresh()
    torch.testing.assert_close(norm.inverse(norm(x)), x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["standardize", "phi_s"])
def test_the_inverse_of_a_bf16_map_keeps_its_spread_around_a_large_mean(mode):
    """The inverse ran in the student's bf16: a channel mean 50x the spread rounded the spread away."""
    x = features() * 0.02 + 50.0  # (each channel: mean ~50, spread ~0.1 to 2)
    norm = FeatureNormalizer(12, mode, eps=0.0)
    norm.add(norm.batch_sums(x))
    norm.refresh()
    back = norm.inverse(norm(x).bfloat16())
    assert back.dtype == torch.float32
    spread = (x - x.mean((2, 3), keepdim=True)).flatten(1)
    got = (back - back.mean((2, 3), keepdim=True)).flatten(1)
    assert torch.nn.functional.cosine_similarity(got, spread).min() > 0.999  # (0.93 when the inverse ran in bf16)


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
    reduced.update(targets, 0, reduce=lambda t: calls.append(t.shape) or t * 2)
    twice.update(targets, 0)
    twice.update(targets, 1)
    assert len(calls) == 1
    for name in dims:
        for r, t in zip(reduced.norms[name], twice.norms[name], strict=True):
            assert torch.equal(r.count, t.count) and torch.equal(r.sum, t.sum) and torch.equal(r.sum_sq, t.sum_sq)


def levels(seed):
    return {"a": TeacherOutput((features(seed, c=12), features(seed + 100, c=20)), None)}


@pytest.mark.parametrize("mode", ["standardize", "phi_s"])
def test_map_is_rebuilt_on_the_schedule_and_fixed_from_until(mode):
    """every=3, until=7: statistics grow at steps 0..6; the map is rebuilt at steps 0, 3, 6 (6 = the last step
    before until) and changes at no other step; from step 7 on nothing changes."""
    norms = TargetNormalizers({"a": (12, 20)}, mode, every=3, until=7)
    probe = levels(99)
    seen, rebuilt = [], []
    for step in range(10):
        before = [n.count.clone() for n in norms.norms["a"]], norms(probe)["a"].levels
        norms.update(levels(step), step)
        after = [n.count.clone() for n in norms.norms["a"]], norms(probe)["a"].levels
        seen.append(all(not torch.equal(b, a) for b, a in zip(before[0], after[0], strict=True)))
        changed = [not torch.equal(b, a) for b, a in zip(before[1], after[1], strict=True)]
        assert all(changed) or not any(changed)  # every level on the same schedule
        rebuilt.append(all(changed))
    assert seen == [True] * 7 + [False] * 3
    assert rebuilt == [s in (0, 3, 6) for s in range(10)]


@pytest.mark.parametrize("mode", ["standardize", "phi_s"])
def test_a_batch_with_a_non_finite_value_adds_nothing_and_rebuild_false_keeps_the_map(mode):
    """A NaN (or inf) anywhere in a batch, on any process, leaves every level's statistics as they were (its
    step is skipped as non-finite; its sums would make every later map NaN); `rebuild=False` (a step's later
    micro-batches) adds the batch but keeps the map."""
    norms = TargetNormalizers({"a": (12, 20)}, mode, every=1, until="never")
    norms.update(levels(0), 0)
    state = {k: v.clone() for k, v in norms.state_dict().items()}
    bad = levels(1)
    bad["a"].levels[1][0, 3, 2, 2] = float("nan")
    norms.update(bad, 1)
    assert all(torch.equal(v, state[k]) for k, v in norms.state_dict().items())
    norms.update(levels(1), 1, reduce=lambda t: t + torch.where(torch.arange(len(t)) == 5, torch.inf, 0.0))
    assert all(torch.equal(v, state[k]) for k, v in norms.state_dict().items())

    probe = levels(99)
    before = norms(probe)["a"].levels
    norms.update(levels(2), 1, rebuild=False)
    assert all(not torch.equal(n.count, state[f"norms.a.{i}.count"]) for i, n in enumerate(norms.norms["a"]))
    assert all(torch.equal(b, a) for b, a in zip(before, norms(probe)["a"].levels, strict=True))
    norms.update(levels(3), 2)
    assert not any(torch.equal(b, a) for b, a in zip(before, norms(probe)["a"].levels, strict=True))


@pytest.mark.parametrize("mode", ["standardize", "phi_s"])
def test_with_gradient_accumulation_the_map_is_rebuilt_once_a_step(mode, tiny_recipe, monkeypatch):
    """grad_accum 2, a rebuild every 2 steps, 4 steps: the maps are rebuilt at steps 0 and 2 only, once each
    (it was once per micro-batch: the two halves of a step were normalised with different maps)."""
    refreshed = []
    refresh = FeatureNormalizer.refresh
    monkeypatch.setattr(
        FeatureNormalizer, "refresh", lambda self, *a, **k: refreshed.append(self) or refresh(self, *a, **k)
    )
    recipe = tiny_recipe(
        "schedule.max_steps=4", "data.batch_size=2", "optim.grad_accum=2", f"loss.normalize={mode}",
        "loss.normalize_every=2", "loss.normalize_until=never", "teachers.1.options.model_kwargs.embed_dim=48",
    )  # fmt: skip
    train(recipe)
    levels_in_all = {id(n) for n in refreshed}
    assert len(refreshed) == 2 * len(levels_in_all)


@pytest.mark.parametrize("mode", ["standardize", "phi_s"])
def test_a_map_rebuilt_later_is_the_map_of_all_the_statistics(mode):
    """Between rebuilds the map stays that of the statistics at the last rebuild; the next rebuild gives
    exactly the map that rebuilding at every step would give (every=1 is the old behaviour)."""
    # eigenvector signs as LAPACK gives them: aligned, each map's signs depend on the maps before it
    sparse = TargetNormalizers({"a": (12, 20)}, mode, every=4, until="never", align_signs=False)
    dense = TargetNormalizers({"a": (12, 20)}, mode, every=1, until="never", align_signs=False)
    first = None
    for step in range(5):
        sparse.update(levels(step), step)
        dense.update(levels(step), step)
        if step == 0:
            first = sparse(levels(99))["a"].levels
        if step in (1, 2, 3):
            for s, f in zip(sparse(levels(99))["a"].levels, first, strict=True):
                assert torch.equal(s, f)
    for s, d in zip(sparse(levels(99))["a"].levels, dense(levels(99))["a"].levels, strict=True):
        assert torch.equal(s, d)


def test_schedule_defaults_follow_each_mode_and_until_follows_every():
    assert normalize_schedule("standardize") == (1, None)
    assert normalize_schedule("phi_s") == (100, 3000)  # RADIO: update period 100, 30 periods of estimation
    assert normalize_schedule("phi_s", every=50) == (50, 1500)
    assert normalize_schedule("phi_s", until="never") == (100, None)
    assert normalize_schedule("standardize", every=10, until=20) == (10, 20)


@pytest.mark.parametrize("mode", ["standardize", "phi_s"])
def test_checkpoint_restores_a_map_older_than_the_statistics(mode):
    """Saved between two rebuilds, the map is not the map of the saved statistics: loading restores it as it
    was, so that a resumed run normalises its targets as the uninterrupted run does."""
    norms = TargetNormalizers({"a": (12, 20)}, mode, every=5, until="never")
    for step in range(3):
        norms.update(levels(step), step)
    loaded = TargetNormalizers({"a": (12, 20)}, mode, every=5, until="never")
    loaded.load_state_dict(norms.state_dict())
    for a, b in zip(loaded(levels(99))["a"].levels, norms(levels(99))["a"].levels, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["standardize", "phi_s"])
def test_statistics_saved_without_a_map_load_with_the_map_of_those_statistics(mode):
    """Checkpoints written before the map was saved hold the statistics only (the map was rebuilt from them
    at every step): they load strictly, with that map."""
    x = features()
    saved = FeatureNormalizer(12, mode, align_signs=False)  # the old rebuild: signs as LAPACK gives them
    saved.add(saved.batch_sums(x))
    saved.refresh()
    old = {k: v for k, v in saved.state_dict().items() if k in ("count", "sum", "sum_sq")}
    loaded = FeatureNormalizer(12, mode)
    loaded.load_state_dict(old)  # strict
    assert torch.equal(loaded(x), saved(x))
    with pytest.raises(RuntimeError, match="Missing key"):  # anything else missing is still an error
        FeatureNormalizer(12, mode).load_state_dict({k: v for k, v in old.items() if k != "sum"})


def test_phi_s_rebuild_keeps_the_previous_maps_eigenvector_signs():
    """Rebuilt from unchanged statistics, the map is the previous one, whatever signs its axes had (LAPACK's
    choice of sign is arbitrary and, through the Hadamard mixing, one flip changes every channel)."""
    x = features()
    norm = FeatureNormalizer(12, "phi_s")
    norm.add(norm.batch_sums(x))
    norm.refresh()
    u = (norm.hadamard.T @ norm.map_w * norm.map_alpha).T
    flips = torch.tensor([1.0, -1.0] * 6, dtype=torch.float64)
    norm.map_w.copy_(norm.hadamard @ (u * flips).T / norm.map_alpha)  # the same eigenbasis, other signs
    expected = norm(x)
    norm.refresh()
    torch.testing.assert_close(norm(x), expected, rtol=1e-9, atol=1e-9)
    norm.refresh(align=False)
    assert not torch.allclose(norm(x), expected)
    mean, cov = channel_stats(norm(x))  # any sign choice is still PHI-S: unit variance on every channel
    torch.testing.assert_close(cov.diagonal(), torch.ones(12, dtype=torch.float64), atol=1e-3, rtol=0)


@pytest.mark.parametrize("precision", ["highest", "medium"])
def test_phi_s_statistics_keep_float32_precision_of_the_covariance_far_from_the_origin(precision):
    """The batch's outer products are taken in float32 on centred tokens (float64 products run at 1/64 of the
    rate on most GPUs): features whose mean (here 1000) dwarfs their spread (0.05 to 2) keep the covariance to
    float32's precision relative to itself, which uncentred float32 products lose entirely; a global
    float32_matmul_precision below "highest" (TF32, bf16 passes) is not used for them, and is left as it was."""
    g = torch.Generator().manual_seed(0)
    x = features(b=8, c=16, h=12, w=12) * torch.linspace(0.01, 0.4, 16).view(1, -1, 1, 1) + 1000.0
    x = x + 0.1 * torch.randn(x.shape, generator=g)
    flat = x.permute(0, 2, 3, 1).reshape(-1, 16).double()
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        norm = FeatureNormalizer(16, "phi_s")
        sums = norm.batch_sums(x)
        assert torch.get_float32_matmul_precision() == precision
    finally:
        torch.set_float32_matmul_precision(before)
    n = flat.shape[0]
    assert sums.dtype == torch.float64 and sums[0] == n
    torch.testing.assert_close(sums[1:17], flat.sum(0), rtol=1e-12, atol=0)
    cov = sums[17:].view(16, 16) / n - torch.outer(sums[1:17] / n, sums[1:17] / n)
    exact = torch.cov(flat.T, correction=0)
    assert ((cov - exact).abs().max() / exact.abs().max()).item() < 1e-5
    naive = (flat.float().T @ flat.float()).double() / n - torch.outer(flat.mean(0), flat.mean(0))
    assert ((naive - exact).abs().max() / exact.abs().max()).item() > 1e-2  # what centring avoids
