"""The teacher-feature cache: exact fp16, bounded int8, stale and corrupt caches refused, reads checked, and
training from it matches training with online teachers (building it: test_cache_build.py; its identity:
test_cache_identity.py)."""

import json
import os
import pickle
import threading

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from sak import digest
from sak.data.fixtures import write_pascal_context
from sak.engine import train
from sak.engine.build import build_loader, build_teachers
from sak.engine.cache import (
    CachedRows,
    CacheError,
    FeatureCache,
    build_cache,
    quantize,
    reader,
)
from sak.engine.trainer import open_cache

STORED = {"fp16": torch.float16, "int8": torch.int8}


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_a_cache_reads_back_the_online_teacher_output_as_stored(tiny_recipe, tmp_path, dtype):
    """fp16: the online output cast to fp16, bit for bit. int8: the online output quantised per image and
    channel (`quantize`) and scaled back, so within half a step of it (the int8 tests compared one int8 read
    with another: a read that left the scale off passed them)."""
    recipe = tiny_recipe("data.options.length=12")
    root = build_cache(recipe, tmp_path / "c", dtype=dtype, shard_size=5, batch_size=12)
    cache = FeatureCache(root)
    set_seed(recipe.run.seed)  # random tiny teachers: the same weights as the build
    teachers = build_teachers(recipe, torch.device("cpu"))
    loader = build_loader(recipe, recipe.data.split, train=False, batch_size=12, augment=False)
    batch = next(iter(loader))
    got = cache.lookup(batch["index"].tolist(), epoch=0)
    for tid, teacher in teachers.items():
        online = teacher.encode(batch["image"])
        for a, b in zip(got[tid].levels, online.levels, strict=True):
            if dtype == "fp16":
                assert torch.equal(a, b.half().float())
                continue
            q, scale = quantize(b)
            step = scale[:, :, None, None]
            assert torch.equal(a, q.float() * step)
            assert (a - b).abs().le(step / 2 + b.abs() * 2**-23).all() and (a != b).any()


def test_int8_is_within_half_a_step_at_every_magnitude_and_under_30_percent_of_fp32(tiny_recipe, tmp_path):
    """float32 scales: no channel underflows to a zero scale or overflows to an infinite one (float16 scales
    did below ~7.6e-6 and above ~8.3e6), and all-zero channels read back exactly 0 with no NaN on the way."""
    magnitudes = torch.cat([torch.logspace(-30, 30, 61), torch.tensor([1e-6, 7.5e-6, 3e-5, 7.5e-4, 1e7, 1e10])])
    x = torch.randn(3, len(magnitudes), 4, 4, generator=torch.Generator().manual_seed(0)) * magnitudes[:, None, None]
    x = torch.cat([x, torch.zeros(3, 2, 4, 4)], 1)  # two all-zero channels
    x[1, 0] = 0  # and one zero channel among tiny ones
    q, scale = quantize(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.isfinite().all()
    back = q.float() * scale[:, :, None, None]
    assert back.isfinite().all()
    zero = x.abs().amax((2, 3)) == 0
    assert (scale[zero] == 0).all() and (back[zero] == 0).all()
    assert (scale[~zero] > 0).all()
    # half a step, up to one float32 rounding of the value itself (no absolute slack: it would hide tiny channels)
    error = (back - x).abs()
    assert error.le(scale[:, :, None, None] / 2 + x.abs() * 2**-23).all()
    amax = x.abs().amax((2, 3))
    assert (error.amax((2, 3))[~zero] / amax[~zero]).max() <= 1 / 254 * (1 + 2**-20)
    # float32's largest value: amax / 127 rounds up there, and 127 steps of that scale read back as inf
    top = torch.tensor([[[[torch.finfo(torch.float32).max, -1.0]]]])
    q, scale = quantize(top)
    back = q.float() * scale[:, :, None, None]
    assert back.isfinite().all() and ((back - top).abs() <= scale / 2).all()
    # the size target at 8 x 8 maps: (64 + 4) / 256 = 27% of float32 (the 4 x 4 maps of the tiny teachers'
    # default size would give (16 + 4) / 64 = 31%, which real teachers' maps, 14 x 14 and larger, never are)
    recipe = tiny_recipe("data.options.length=8", "teachers.0.image_size=112", "teachers.1.image_size=128")
    root = build_cache(recipe, tmp_path / "q", dtype="int8", shard_size=8)
    stored = load_file(str(root / "view0" / "shard00000.safetensors"))
    assert {tuple(t.shape[-2:]) for k, t in stored.items() if not k.endswith("/scale")} == {(8, 8)}
    int8_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    fp32_bytes = sum(t.numel() * 4 for k, t in stored.items() if not k.endswith("/scale"))
    assert int8_bytes <= 0.30 * fp32_bytes


def test_stale_and_corrupt_caches_are_refused(tiny_recipe, tmp_path):
    recipe = tiny_recipe("data.options.length=8")
    root = build_cache(recipe, tmp_path / "c", shard_size=4)
    changed = tiny_recipe("data.options.length=8", "teachers.0.levels=[0, 1, 2, 3]", f"cache.path={root}")
    changed_default = tiny_recipe("data.options.length=8", "teachers.0.image_size=42", f"cache.path={root}")
    with pytest.raises(
        CacheError,
        match=r"stale cache .*teachers\.vit_a\.input_size \(the teacher's image_size\): cache has 56, recipe gives 42",
    ):
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
    with pytest.raises(CacheError, match="shard view0/shard00001 is corrupt"):
        FeatureCache(root).verify_all()  # (the shards hashed together, on threads)
    intact = FeatureCache(root)
    intact.lookup([0], epoch=0)  # only the shard read is hashed and marked verified
    assert set(intact._verified) == {"view0/shard00000"}
    with pytest.raises(CacheError, match="no manifest.json"):
        FeatureCache(tmp_path)


def test_verification_splits_the_shards_over_processes_and_every_process_refuses_a_bad_one(
    tiny_recipe, tmp_path, monkeypatch
):
    root = build_cache(tiny_recipe("data.options.length=10"), tmp_path / "c", shard_size=2)  # 5 shards
    hashed, sha256_files = [], reader.sha256_files
    monkeypatch.setattr(reader, "sha256_files", lambda paths, threads=None: hashed.append(
        sorted(p.name for p in paths)) or sha256_files(paths, threads))  # fmt: skip
    caches = [FeatureCache(root), FeatureCache(root)]
    for i, cache in enumerate(caches):
        cache.verify_all(part=(i, 2))  # no gather: what the other process checks stays unchecked here
    assert hashed[0] == [f"shard0000{k}.safetensors" for k in (0, 2, 4)]
    assert hashed[1] == ["shard00001.safetensors", "shard00003.safetensors"]
    assert [len(c._verified) for c in caches] == [3, 2]
    caches = _verify_as_two_processes(root)
    assert all(len(c._verified) == 5 for c in caches)  # what the other process checked counts as checked
    shard = root / "view0" / "shard00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    found = [FeatureCache(root)._problems([f"view0/shard0000{k}" for k in ks])[0] for ks in ((0, 2, 4), (1, 3))]
    assert found == [[], ["shard view0/shard00003 is corrupt (sha256 differs from the manifest)"]]
    pooled = found[0] + found[1]  # what a gather over the two processes gives each
    with pytest.raises(CacheError, match="shard view0/shard00003 is corrupt"):
        FeatureCache(root).verify_all(part=(0, 2), share=lambda mine: pooled)  # process 0 found nothing itself


class _ThreadGather:
    """`gather_object` for processes played by threads: each `share(rank)(mine)` returns every rank's list,
    joined in rank order; `before` (if set) runs once, when all have arrived at the first gather."""

    def __init__(self, n: int, before=None):
        self.lists, self.calls, self.before = {}, 0, before
        self.barrier = threading.Barrier(n, action=self._join)

    def _join(self):
        if self.calls == 0 and self.before is not None:
            self.before()
        self.calls += 1
        self.joined = [x for rank in sorted(self.lists) for x in self.lists[rank]]

    def share(self, rank: int):
        def gather(mine: list) -> list:
            self.lists[rank] = list(mine)
            self.barrier.wait()
            joined = self.joined
            self.barrier.wait()  # (all have read it before the next gather overwrites it)
            return joined

        return gather


def _verify_as_two_processes(root, before=None) -> list[FeatureCache]:
    """`verify_all` of two caches on threads, as processes 0 and 1 of 2 with a gather between them."""
    caches, gather = [FeatureCache(root), FeatureCache(root)], _ThreadGather(2, before=before)
    threads = [threading.Thread(target=c.verify_all, kwargs={"part": (i, 2), "share": gather.share(i)})
               for i, c in enumerate(caches)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return caches


def test_a_shard_rewritten_after_another_process_hashed_it_is_not_taken_as_checked(tiny_recipe, tmp_path):
    """Process 1 hashes shard 1 and finds it intact; it is rewritten (same size) before process 0 looks at
    it: process 0 must hash it itself when it reads it, not trust process 1's check of other bytes."""
    root = build_cache(tiny_recipe("data.options.length=4"), tmp_path / "c", shard_size=2)  # 2 shards
    shard = root / "view0" / "shard00001.safetensors"

    def rewrite():
        data = shard.read_bytes()
        shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
        os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))

    caches = _verify_as_two_processes(root, before=rewrite)
    assert set(caches[0]._verified) == {"view0/shard00000"}
    with pytest.raises(CacheError, match="shard view0/shard00001 is corrupt"):
        caches[0].lookup([2], epoch=0)


def test_training_checks_the_shards_on_at_most_16_threads(tiny_recipe, tmp_path, monkeypatch):
    root = build_cache(tiny_recipe("data.options.length=8"), tmp_path / "c", shard_size=4)
    threads, verify_all = [], FeatureCache.verify_all
    monkeypatch.setattr(digest, "usable_cpus", lambda: 128)  # a large node: not one thread per CPU
    monkeypatch.setattr(FeatureCache, "verify_all", lambda self, n, *a: threads.append(n) or verify_all(self, n, *a))
    train(tiny_recipe("data.options.length=8", "schedule.max_steps=1", f"cache.path={root}"))
    assert threads == [16]


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
    """Each batch's maps are read by the loader (here, without a GPU, in its workers' collate): 2 workers give
    bit for bit the losses of 0 workers, over two epochs of two views."""
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


def pascal_semseg(root) -> list[str]:
    """Overrides: train on the PASCAL-Context layout at `root` with the semseg task."""
    return ["data.name=pascal_context", f"data.root={root}", "data.options={}", "run.stage=multitask",
            "tasks=[{name: semseg, channels: 21}]"]  # fmt: skip


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_a_batch_is_read_from_the_shard_files_as_stored(tiny_recipe, tmp_path, dtype):
    """`gather` reads each sample's rows, across shards and for the epoch's view, straight into the batch
    (new tensors, or the ones given), equal to the stored tensors; one thread or several."""
    recipe = tiny_recipe("data.options.length=12")
    cache = FeatureCache(build_cache(recipe, tmp_path / "c", views=2, augment=True, shard_size=5, dtype=dtype))
    indices = [11, 0, 7, 4, 5, 4]  # three shards, the short last one, out of order, one sample twice
    for epoch in (0, 1, 3):
        stored = [load_file(tmp_path / f"c/view{epoch % 2}/shard{k:05d}.safetensors") for k in range(3)]
        got = cache.gather(indices, epoch)
        assert list(got) == cache.keys and set(got) == set(stored[0])
        for key, batch in got.items():
            want = torch.stack([stored[i // 5][key][i % 5] for i in indices])
            assert batch.dtype == want.dtype == (torch.float32 if key.endswith("/scale") else STORED[dtype])
            assert torch.equal(batch, want) and batch.is_contiguous() and not batch.is_shared()
            assert torch.equal(cache.rows(7, epoch)[key], stored[1][key][2])
        threaded = cache.gather(indices, epoch, threads=3)
        assert all(torch.equal(threaded[k], got[k]) for k in got)
        given = {k: torch.full_like(v, 3) for k, v in got.items()}
        assert cache.gather(indices, epoch, out=given) is given and all(torch.equal(given[k], got[k]) for k in got)
    assert not torch.equal(cache.gather(range(12), 0)["vit_a/0"], cache.gather(range(12), 1)["vit_a/0"])  # (flips)
    with pytest.raises(CacheError, match="sample index 12 is out of range: the cache holds 12 samples"):
        cache.gather([0, 12], 0)
    # the widened maps: lookup = targets(gather) = targets of the batch's CachedRows, read where needed
    rows = CachedRows(cache, indices, epoch=1)
    for a, b in zip(cache.lookup(indices, 1).values(), cache.targets(rows).values(), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.levels, b.levels, strict=True))


def _overwrite(path, data: bytes) -> None:
    """A new file with `data` renamed over `path`: a shard rebuilt at its path."""
    path.with_suffix(".new").write_bytes(data)
    os.replace(path.with_suffix(".new"), path)


def test_a_shard_changed_during_training_is_an_error_not_a_crash(tiny_recipe, tmp_path):
    """Nothing stays memory-mapped, and every read checks that the file is the one whose sha256 was checked
    (device, inode, size, modification time): a shard truncated (a copy over the cache, a failing disk) is a
    CacheError naming it where a mapped file would kill the process with SIGBUS; so is a shard written or
    replaced at its path after the check, before its first read or after it."""
    root = build_cache(tiny_recipe("data.options.length=12"), tmp_path / "c", shard_size=4)
    cache = FeatureCache(root)
    cache.verify_all()
    shards = [root / "view0" / f"shard{k:05d}.safetensors" for k in range(3)]
    data = shards[2].read_bytes()
    with open(shards[2], "r+b") as f:  # changed in place after the check, before any read
        f.seek(len(data) - 64)
        f.write(bytes(64))
    with pytest.raises(CacheError, match=r"shard view0/shard00002 changed since its sha256 was checked"):
        cache.gather([9], 0)
    cache.gather([0, 5], 0)
    before = shards[1].stat()
    os.truncate(shards[1], before.st_size // 2)  # cut short after its first read
    assert torch.equal(cache.rows(0, 0)["vit_a/0"], cache.gather([0], 0)["vit_a/0"][0])  # the intact shard
    with pytest.raises(CacheError, match=r"shard view0/shard00001 changed since its sha256 was checked"):
        cache.gather([0, 7], 0)
    # the same size and time stamp (a signature that cannot tell): a short read is still named
    os.utime(shards[1], ns=(before.st_atime_ns, before.st_mtime_ns))
    layout = cache._layouts["view0/shard00001"]
    cache._layouts["view0/shard00001"] = (*layout[:2], reader._signature(shards[1].stat()))
    with pytest.raises(CacheError, match=r"shard view0/shard00001 is shorter than its header says"):
        cache.gather([7], 0)
    _overwrite(shards[0], shards[0].read_bytes())  # the same bytes in a new file: not the file that was checked
    with pytest.raises(CacheError, match=r"shard view0/shard00000 changed since its sha256 was checked \(rebuilt"):
        cache.gather([1], 0)


def test_a_shard_copied_over_in_place_with_its_old_time_stamp_is_named(tiny_recipe, tmp_path):
    """`cp -p` of another shard of the same layout over a checked one keeps its device, inode, size and
    modification time; only the change time tells, and the read must not return bytes never checked."""
    root = build_cache(tiny_recipe("data.options.length=8"), tmp_path / "c", shard_size=4)
    cache = FeatureCache(root)
    cache.verify_all()
    shards = [root / "view0" / f"shard{k:05d}.safetensors" for k in range(2)]
    cache.gather([0], 0)
    before = shards[0].stat()
    other = shards[1].read_bytes()
    assert len(other) == before.st_size
    with open(shards[0], "r+b") as f:  # what cp -p does: written in place, then its time stamps set back
        f.write(other)
    os.utime(shards[0], ns=(before.st_atime_ns, before.st_mtime_ns))
    after = shards[0].stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    with pytest.raises(CacheError, match=r"shard view0/shard00000 changed since its sha256 was checked \(its bytes"):
        cache.gather([1], 0)


def test_a_shard_whose_metadata_changed_during_training_is_hashed_again_and_read_on(tiny_recipe, tmp_path):
    """A chmod (a finished cache made read-only) or a hard link (`cp -al`, `rsync --link-dest`) moves only the
    change time: the shard is hashed again once, and its rows read on, as before."""
    root = build_cache(tiny_recipe("data.options.length=8"), tmp_path / "c", shard_size=4)
    cache = FeatureCache(root)
    cache.verify_all()
    shard = root / "view0" / "shard00000.safetensors"
    first = cache.gather([0, 1], 0)
    shard.chmod(0o444)
    os.link(shard, tmp_path / "linked.safetensors")
    again = cache.gather([0, 1], 0)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert cache._verified["view0/shard00000"] == reader._signature(shard.stat())


def test_loader_workers_refuse_a_shard_replaced_between_epochs(tiny_recipe, tmp_path):
    """Workers are rebuilt every epoch and read without a GPU; they check against what the training process
    verified when the run started, not against the files they find."""
    recipe = tiny_recipe("data.options.length=8", "data.num_workers=2", "data.batch_size=4")
    root = build_cache(recipe, tmp_path / "c", shard_size=4)
    cache = FeatureCache(root)
    cache.verify_all()
    loader = build_loader(recipe, recipe.data.split, train=True, augment=False)
    loader.dataset.views, loader.dataset.cache = cache.views, cache
    assert len(list(loader)) == 2
    shard = root / "view0" / "shard00001.safetensors"
    _overwrite(shard, shard.read_bytes())
    with pytest.raises(CacheError, match=r"shard view0/shard00001 changed since its sha256 was checked"):
        list(loader)


def test_a_loader_that_does_not_pin_reads_the_maps_in_its_workers(tiny_recipe, tmp_path):
    """Without a GPU (no pinning) the maps are read in the collate, in each worker, into shared memory (no
    copy on the way to the training process), so a CPU training step never waits for them."""
    recipe = tiny_recipe("data.options.length=12", "data.num_workers=2", "data.batch_size=4")
    cache = FeatureCache(build_cache(recipe, tmp_path / "c", dtype="int8", shard_size=5))
    loader = build_loader(recipe, recipe.data.split, train=True, augment=False)
    assert not loader.dataset.pinned  # (no CUDA device here)
    loader.dataset.views, loader.dataset.cache = cache.views, cache
    for batch in loader:
        assert set(batch["cached"]) == set(cache.keys)
        for key, value in batch["cached"].items():
            assert value.is_shared() and torch.equal(value, cache.gather(batch["index"].tolist(), 0)[key])


def test_a_pickled_cache_is_the_one_this_process_opened(tiny_recipe, tmp_path, monkeypatch):
    """What crosses from a loader worker in every batch is a token and a path, not the manifest; in the process
    that opened the cache it is that instance again (its shards verified once), and elsewhere a cache opened
    from the path under the same token."""
    root = build_cache(tiny_recipe("data.options.length=6"), tmp_path / "c", shard_size=4)
    cache = FeatureCache(root)
    cache.verify_all()
    cache.gather([0, 5], 0)
    batch = pickle.dumps(CachedRows(cache, [0, 5], 0))
    assert len(batch) < 300 + len(str(root))
    back = pickle.loads(batch)
    assert back.cache is cache and back.indices == [0, 5] and back.epoch == 0
    monkeypatch.setattr(reader, "_OPEN", type(reader._OPEN)())  # another process
    other = pickle.loads(batch).cache
    assert other is not cache and other.token == cache.token and other.root == cache.root
    assert other._verified == {} and other._layouts == {} and other._content == cache._content
    assert pickle.loads(batch).cache is other
    # the cache itself (the dataset sent to a worker started by spawn) carries the shards verified so far
    monkeypatch.setattr(reader, "_OPEN", type(reader._OPEN)())
    copy = pickle.loads(pickle.dumps(cache))
    assert (
        copy is not cache and copy._verified == cache._verified and set(copy._verified) == set(cache.manifest["shards"])
    )


def test_the_pin_memory_step_reads_a_batchs_rows_page_locked_with_several_threads(tiny_recipe, tmp_path, monkeypatch):
    """PyTorch's pin-memory step (what its pin thread runs on each batch) hands "cached" to
    `CachedRows.pin_memory`, which reads page-locked with this process's share of the CPUs (at most 8); the
    batch then holds the read tensors. (Page-locking itself needs a GPU: test_cache_gpu.py.)"""
    from torch.utils.data._utils.pin_memory import pin_memory

    root = build_cache(tiny_recipe("data.options.length=6"), tmp_path / "c", shard_size=4)
    cache = FeatureCache(root)
    calls, gather = [], FeatureCache.gather

    def unpinned(self, indices, epoch, pin=False, threads=1, out=None):
        calls.append((pin, threads))
        return gather(self, indices, epoch, False, threads, out)

    monkeypatch.setattr(FeatureCache, "gather", unpinned)
    monkeypatch.setattr(reader, "usable_cpus", lambda: 12)
    out = pin_memory({"cached": CachedRows(cache, [1, 4], 0)})  # (a tensor beside it would need a GPU)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 processes on this machine: 12 / 4 each
    pin_memory({"cached": CachedRows(cache, [1, 4], 0)})
    assert calls == [(True, 8), (True, 3)]
    assert set(out["cached"]) == set(cache.keys)
    assert torch.equal(out["cached"]["vit_a/0"], cache.gather([1, 4], 0)["vit_a/0"])


def test_a_short_last_shard_is_read_to_its_end_and_no_further(tiny_recipe, tmp_path):
    root = build_cache(tiny_recipe("data.options.length=6"), tmp_path / "c", shard_size=4)
    cache = FeatureCache(root)
    assert cache.rows(5, epoch=0)["vit_a/0"].shape == (48, 4, 4)
    with pytest.raises(CacheError, match="sample index 6 is out of range: the cache holds 6 samples"):
        cache.rows(6, epoch=0)


def test_a_letterboxing_teachers_maps_of_non_square_crops_are_cached_as_online_cut_to_the_image(tiny_recipe, tmp_path):
    """SAM's maps of 48 x 64 crops are its 6 of 8 token rows that cover the image (Teacher.image_region): the
    cache stores those shapes, says so in its identity, and reads back what online training computes."""
    data = write_pascal_context(tmp_path / "PASCAL_MT", n_train=3, n_val=1, size=(48, 64))
    sam = ("teachers.1={name: sam, key: sam, options: {source: timm, model_kwargs: {img_size: 64, patch_size: 8, "
           "embed_dim: 32, depth: 2, num_heads: 2, window_size: 4, global_attn_indexes: [1], neck_chans: 16}}}")  # fmt: skip
    common = [*pascal_semseg(data), "data.options={crop_size: [48, 64]}", "data.batch_size=3", sam]
    recipe = tiny_recipe(*common)
    root = build_cache(recipe, tmp_path / "c", shard_size=4, augment=True)
    cache = FeatureCache(root)
    assert cache.manifest["shapes"]["sam"] == [[32, 6, 8]] * 2 and cache.manifest["shapes"]["vit_a"][0][1:] == [4, 4]
    assert cache.manifest["identity"]["teachers"]["sam"]["maps"] == "image tokens"
    assert "maps" not in cache.manifest["identity"]["teachers"]["vit_a"]
    set_seed(recipe.run.seed)
    teachers = build_teachers(recipe, torch.device("cpu"))
    loader = build_loader(recipe, recipe.data.split, train=True, augment=True)
    batch = [loader.dataset[i] for i in range(3)]
    images = torch.stack([s["image"] for s in batch])
    assert images.shape[-2:] == (48, 64)
    got = cache.lookup([s["index"] for s in batch], epoch=0)
    for tid, teacher in teachers.items():
        for a, b in zip(got[tid].levels, teacher.encode(images).levels, strict=True):
            assert torch.equal(a, b.half().float())
