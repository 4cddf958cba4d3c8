"""The training loader's pin-memory thread reads a batch's cached maps straight into page-locked memory."""

import pytest
import torch

from sak.engine.build import build_loader
from sak.engine.cache import FeatureCache, build_cache


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("workers", [0, 2])
def test_the_training_loader_hands_out_page_locked_maps_read_in_this_process(tiny_recipe, tmp_path, workers):
    """With workers (the pin-memory thread) and without (pinned inline), every batch's "cached" arrives as
    page-locked tensors in their stored dtype, equal to the rows stacked, and widens on the GPU to what
    `lookup` gives."""
    recipe = tiny_recipe("data.options.length=12", f"data.num_workers={workers}", "data.batch_size=4")
    cache = FeatureCache(build_cache(recipe, tmp_path / "c", dtype="int8", shard_size=5))
    loader = build_loader(recipe, recipe.data.split, train=True, augment=False)
    assert loader.pin_memory
    loader.dataset.views, loader.dataset.cache = cache.views, cache
    batches = 0
    for batch in loader:
        indices = batch["index"].tolist()
        assert set(batch["cached"]) == set(cache.keys)
        for key, value in batch["cached"].items():
            assert value.is_pinned() and not value.is_cuda
            assert torch.equal(value, torch.stack([cache.rows(i, 0)[key] for i in indices]))
        got = cache.targets(batch["cached"], "cuda")
        want = cache.lookup(indices, 0, "cuda")
        for tid in want:
            assert all(torch.equal(a, b) for a, b in zip(got[tid].levels, want[tid].levels, strict=True))
        batches += 1
    assert batches == 3
