"""The teacher-feature cache: exact fp16, bounded int8, stale and corrupt caches refused, resumable,
and training from it matches training with online teachers."""

import json

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from sak.engine import train
from sak.engine.build import build_loader, build_teachers
from sak.engine.cache import CacheError, FeatureCache, build_cache, quantize
from sak.engine.trainer import open_cache


def test_fp16_cache_equals_online_teacher_output_cast_to_fp16(tiny_recipe, tmp_path):
    recipe = tiny_recipe("data.options.length=12")
    root = build_cache(recipe, tmp_path / "c", shard_size=5, batch_size=4)
    cache = FeatureCache(root)
    set_seed(recipe.run.seed)  # random tiny teachers: the same weights as the build
    teachers = build_teachers(recipe, torch.device("cpu"))
    loader = build_loader(recipe, recipe.data.split, train=False, batch_size=12, augment=False)
    batch = next(iter(loader))
    got = cache.lookup(batch["index"].tolist(), epoch=0)
    for tid, teacher in teachers.items():
        online = teacher.encode(batch["image"])
        for a, b in zip(got[tid].levels, online.levels, strict=True):
            assert torch.equal(a, b.half().float())


def test_int8_is_within_half_a_step_and_under_30_percent_of_fp32(tiny_recipe, tmp_path):
    x = torch.randn(3, 8, 4, 4) * torch.linspace(0.1, 10, 8)[None, :, None, None]
    q, scale = quantize(x)
    step = scale.float()[:, :, None, None]
    assert scale.dtype == torch.float16 and (q.float() * step - x).abs().le(step / 2 + 1e-6).all()
    recipe = tiny_recipe("data.options.length=8")
    root = build_cache(recipe, tmp_path / "q", dtype="int8", shard_size=8)
    stored = load_file(str(root / "view0" / "shard00000.safetensors"))
    int8_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    fp32_bytes = sum(t.numel() * 4 for k, t in stored.items() if not k.endswith("/scale"))
    assert int8_bytes <= 0.30 * fp32_bytes


def test_stale_and_corrupt_caches_are_refused(tiny_recipe, tmp_path):
    recipe = tiny_recipe("data.options.length=8")
    root = build_cache(recipe, tmp_path / "c", shard_size=4)
    changed = tiny_recipe("data.options.length=8", "teachers.0.levels=[0, 1, 2, 3]", f"cache.path={root}")
    changed_default = tiny_recipe("data.options.length=8", "teachers.0.image_size=42", f"cache.path={root}")
    with pytest.raises(CacheError, match=r"stale cache .*teachers\.vit_a\.input_size: cache has 56, recipe gives 42"):
        train(changed_default)
    bf16 = tiny_recipe("data.options.length=8", "precision.mixed=bf16", f"cache.path={root}")
    with pytest.raises(
        CacheError, match=r"stale cache .*teacher_precision: cache has 'float32', recipe gives 'bfloat16'"
    ):
        open_cache(bf16, build_teachers(bf16, torch.device("cpu")))  # what train() checks before any step
    train(changed)  # [0, 1, 2, 3] are the default levels of a 4-block teacher: same features, accepted
    shard = root / "view0" / "shard00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="shard view0/shard00001 is corrupt"):
        FeatureCache(root).lookup([5], epoch=0)
    with pytest.raises(CacheError, match="no manifest.json"):
        FeatureCache(tmp_path)


def test_building_resumes_where_it_stopped(tiny_recipe, tmp_path):
    recipe = tiny_recipe("data.options.length=12")
    root = build_cache(recipe, tmp_path / "c", shard_size=4)
    kept = root / "view0" / "shard00000.safetensors"
    before = kept.stat().st_mtime_ns
    (root / "view0" / "shard00002.safetensors").unlink()
    build_cache(recipe, root, shard_size=4)
    assert kept.stat().st_mtime_ns == before
    assert (root / "view0" / "shard00002.safetensors").is_file()
    assert len(json.loads((root / "manifest.json").read_text())["shards"]) == 3


def test_training_from_augmented_views_matches_online_teachers(tiny_recipe, tmp_path):
    common = ["schedule.max_steps=16", "logging.sample_ids=true"]  # 32 samples, batch 4: two epochs
    root = build_cache(tiny_recipe(*common), tmp_path / "c", views=2, augment=True, shard_size=16)
    online = tiny_recipe(*common, "run.name=online")
    cached = tiny_recipe(*common, "run.name=cached", f"cache.path={root}")
    train(online)
    train(cached)

    def losses(r):
        rows = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [x["loss"] for x in rows if "loss" in x]

    assert losses(cached) == pytest.approx(losses(online), rel=2e-3)


def test_loader_workers_read_the_cache_exactly_as_the_training_process(tiny_recipe, tmp_path):
    """The cached maps travel with each sample from the DataLoader workers (read there, widened in the
    training process): 2 workers give bit for bit the losses of 0 workers, over two epochs of two views."""
    common = ["schedule.max_steps=16", "data.options.length=32"]
    root = build_cache(tiny_recipe(*common), tmp_path / "c", views=2, augment=True, shard_size=16, dtype="int8")
    runs = [tiny_recipe(*common, f"run.name=w{n}", f"data.num_workers={n}", f"cache.path={root}") for n in (0, 2)]
    for r in runs:
        train(r)

    def losses(r):
        rows = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [x["loss"] for x in rows if "loss" in x]

    assert len(losses(runs[0])) == 16 and losses(runs[1]) == losses(runs[0])
    # with workers, a corrupt shard is found before the first step (every shard is verified up front)
    shard = root / "view1" / "shard00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = tiny_recipe(*common, "run.name=bad", "data.num_workers=2", f"cache.path={root}")
    with pytest.raises(CacheError, match="shard view1/shard00001 is corrupt"):
        train(bad)
    assert not (bad.run_dir / "metrics.jsonl").exists() or "loss" not in (bad.run_dir / "metrics.jsonl").read_text()
