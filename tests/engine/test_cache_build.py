"""Building the teacher-feature cache: resumable after a kill at any point, refusing what cannot be reused,
damaged shards built again, teacher outputs it could not store refused, and the `sak cache` commands."""

import json
import os

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from sak import digest
from sak.cli import main
from sak.data.fixtures import write_pascal_context
from sak.engine import train
from sak.engine.build import build_teachers
from sak.engine.cache import (
    CacheError,
    FeatureCache,
    build_cache,
    builder,
    store,
)
from sak.engine.trainer import open_cache

from .test_cache import pascal_semseg


def test_loader_workers_build_the_same_shards(tiny_recipe, tmp_path):
    """The build reads the images with data.num_workers processes: the same views, byte for byte (batches of 3
    in shards of 4: a shard's last batch is short)."""
    common = ["data.options.length=10", "data.options.classes=3"]
    serial = build_cache(tiny_recipe(*common), tmp_path / "serial", views=2, augment=True, shard_size=4, batch_size=3)
    workers = build_cache(tiny_recipe(*common, "data.num_workers=2"), tmp_path / "workers", views=2, augment=True,
                          shard_size=4, batch_size=3)  # fmt: skip
    names = sorted(p.relative_to(serial).as_posix() for p in serial.rglob("*.safetensors"))
    assert len(names) == 6 and names == sorted(
        p.relative_to(workers).as_posix() for p in workers.rglob("*.safetensors")
    )
    for name in names:
        a, b = load_file(str(serial / name)), load_file(str(workers / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (
        json.loads((serial / "manifest.json").read_text())["shards"]
        == json.loads((workers / "manifest.json").read_text())["shards"]
    )


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


def _crash_after(monkeypatch, shards: int) -> None:
    """Make build_cache stop (as a killed process would) once `shards` shards are written."""
    save, written = builder._atomic_save, []

    def crash(tensors, path, **kwargs):
        if len(written) == shards:
            raise KeyboardInterrupt("simulated crash")
        save(tensors, path, **kwargs)
        written.append(path)

    monkeypatch.setattr(builder, "_atomic_save", crash)


def test_an_interrupted_build_is_resumed_only_with_the_same_recipe(tiny_recipe, tmp_path, monkeypatch):
    """The manifest is written, "building", before the first shard: resuming with another recipe (here another
    seed: other random teachers and other images) is refused instead of keeping the other build's shard."""
    a, b = tiny_recipe("data.options.length=8"), tiny_recipe("data.options.length=8", "run.seed=1")
    root = tmp_path / "c"
    _crash_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        build_cache(a, root, shard_size=4)
    monkeypatch.undo()
    assert json.loads((root / "manifest.json").read_text())["status"] == "building"
    with pytest.raises(CacheError, match="unfinished teacher-feature cache"):
        FeatureCache(root)  # an unfinished build is not read
    with pytest.raises(
        CacheError, match=rf"{root} holds an unfinished cache .*data\.seed: cache has 0, this build gives 1"
    ):
        build_cache(b, root, shard_size=4)
    # without its manifest, the shard still says which build it belongs to
    (root / "manifest.json").unlink()
    with pytest.raises(CacheError, match=r"shard00000\.safetensors was written by another build"):
        build_cache(b, root, shard_size=4)
    kept = root / "view0" / "shard00000.safetensors"
    before = kept.stat().st_mtime_ns
    build_cache(a, root, shard_size=4)  # the same recipe resumes and keeps the finished shard
    assert kept.stat().st_mtime_ns == before
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["shards"]) == 2
    set_seed(a.run.seed)
    open_cache(tiny_recipe("data.options.length=8", f"cache.path={root}"), build_teachers(a, torch.device("cpu")))


def test_rebuilding_with_another_shard_size_or_sample_count_is_refused(tiny_recipe, tmp_path):
    recipe = tiny_recipe("data.options.length=8")
    root = build_cache(recipe, tmp_path / "c", shard_size=4)
    with pytest.raises(
        CacheError, match=r"holds a cache built with other settings.*shard_size: cache has 4, this build gives 2"
    ):
        build_cache(recipe, root, shard_size=2)
    with pytest.raises(
        CacheError, match=r"identity\.data\.samples: cache has 8, this build gives 10.*samples: cache has 8"
    ):
        build_cache(tiny_recipe("data.options.length=10"), root, shard_size=4)
    assert sorted(p.name for p in (root / "view0").iterdir()) == [
        "shard00000.safetensors", "shard00000.sha256", "shard00001.safetensors", "shard00001.sha256"
    ]  # fmt: skip


def test_the_manifest_is_synced_and_a_damaged_one_is_named(tiny_recipe, tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    recipe = tiny_recipe("data.options.length=4")
    root = build_cache(recipe, tmp_path / "c", shard_size=4)
    monkeypatch.undo()
    assert str(root / "manifest.partial") in synced and str(root) in synced  # the file, then its rename
    manifest = root / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])  # truncated
    with pytest.raises(CacheError, match=rf"{manifest} is not a valid cache manifest"):
        FeatureCache(root)
    with pytest.raises(CacheError, match=rf"{manifest} is not a valid cache manifest"):
        build_cache(recipe, root, shard_size=4)


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_the_size_estimate_is_the_stored_bytes_and_a_build_that_would_not_fit_is_refused(
    tiny_recipe, tmp_path, monkeypatch, capsys, dtype
):
    recipe = tiny_recipe("data.options.length=6")
    root = build_cache(recipe, tmp_path / "c", dtype=dtype, shard_size=4)
    stored = sum(t.numel() * t.element_size() for p in root.rglob("*.safetensors") for t in load_file(str(p)).values())
    shapes = json.loads((root / "manifest.json").read_text())["shapes"]
    assert stored == 6 * store.bytes_per_sample(shapes, dtype)
    assert f"2 of 2 shards to write, about {builder.size(stored)}" in capsys.readouterr().out  # (0.00 GiB before)
    assert (
        builder.size(3 * 2**29) == "1.50 GiB" and builder.size(3 * 2**19) == "1.5 MiB" and builder.size(3000) == "3 KiB"
    )
    usage = builder.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(builder.shutil, "disk_usage", lambda path: usage._replace(free=stored - 1))
    # the stored bytes and 64 KiB a shard (header, sha256 file, block rounding)
    with pytest.raises(CacheError, match=rf"remaining shards need about {builder.size(stored + 2 * 2**16)}, but "
                       rf"only {builder.size(stored - 1)} are free"):  # fmt: skip
        build_cache(recipe, tmp_path / "d" / "e", dtype=dtype, shard_size=4)
    assert not (tmp_path / "d").exists()  # refused before anything was written
    build_cache(recipe, root, dtype=dtype, shard_size=4)  # finished: nothing left to write, nothing needed


def test_build_settings_that_cannot_give_a_usable_cache_are_refused(tiny_recipe, tmp_path, monkeypatch):
    recipe = tiny_recipe("data.options.length=4")
    with pytest.raises(ValueError, match="4 views without augment would be 4 copies"):
        build_cache(recipe, tmp_path / "a", views=4)
    with pytest.raises(ValueError, match="cache views must be a positive integer, got 0"):
        build_cache(recipe, tmp_path / "b", views=0, augment=True)
    with pytest.raises(ValueError, match="cache shard size must be a positive integer, got 0"):
        build_cache(recipe, tmp_path / "c", shard_size=0)
    # more shards than a cache may hold: refused before the build, not by training after it (MAX_SHARDS)
    import sak.engine.cache.builder as builder

    monkeypatch.setattr(builder, "MAX_SHARDS", 3)
    with pytest.raises(CacheError, match=r"2 view\(s\) of 4 samples in shards of 1 make more than 3 shards"):
        build_cache(recipe, tmp_path / "d", views=2, augment=True, shard_size=1)
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_cache_build_command_prints_cache_errors_and_exits_2(tiny_recipe, tmp_path, capsys, monkeypatch):
    from tests.conftest import TINY

    out = tmp_path / "c"
    command = ["cache", "build", str(TINY), f"run.output_dir={tmp_path}", "data.options.length=4", "--out", str(out)]
    for bad, message in ((["--views", "0"], "views must be a positive integer"),
                         (["--shard-size", "0"], "shard size must be a positive integer"),
                         (["--views", "4"], "add --augment")):  # fmt: skip
        assert main([*command, *bad]) == 2
        assert message in capsys.readouterr().err
    assert main([*command, "--shard-size", "4"]) == 0
    capsys.readouterr()
    # --verify after a build reads every shard back (it was accepted and ignored): here one the disk damaged
    assert main([*command, "--shard-size", "4", "--verify"]) == 0
    assert "every shard matches its sha256 (1 checked)" in capsys.readouterr().out
    import sak.engine.cache as cache_module

    build = cache_module.build_cache

    def then_damaged(*args):
        root = build(*args)
        shard = next(root.rglob("*.safetensors"))
        shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
        return root

    monkeypatch.setattr(cache_module, "build_cache", then_damaged)
    assert main([*command, "--shard-size", "4", "--verify"]) == 2
    assert "shard view0/shard00000 is corrupt" in capsys.readouterr().err
    monkeypatch.undo()
    assert main([*command, "--shard-size", "2"]) == 2  # a CacheError, printed without a traceback
    err = capsys.readouterr().err
    assert err.startswith(f"sak: {out} holds a cache") and "shard_size: cache has 4, this build gives 2" in err
    assert "Traceback" not in err


def test_cache_info_says_what_a_cache_holds_and_checks_its_shards(tiny_recipe, tmp_path, capsys, monkeypatch):
    data = write_pascal_context(tmp_path / "PASCAL_MT", n_train=3, n_val=1, size=(48, 64))
    root = build_cache(tiny_recipe(*pascal_semseg(data)), tmp_path / "c", views=2, augment=True, shard_size=2)
    assert main(["cache", "info", str(root), "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"cache {root} (format 3): complete, 4 shards" in out
    assert "fp16, 2 augmented view(s), 3 samples in shards of 2" in out
    assert (
        "vit_a: vit_small_patch14_dinov2 from timm, weights random, input 56 px, levels [0, 1, 2, 3]: maps 48x4x4"
        in out
    )
    assert f"data: pascal_context at {data}, split train" in out and "tasks ['semseg']" in out
    assert "every shard matches its sha256 (4 checked)" in out
    shard = root / "view1" / "shard00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    assert main(["cache", "info", str(root), "--verify"]) == 2
    assert "shard view1/shard00001 is corrupt" in capsys.readouterr().err
    # two directories: the second was not looked at, and the corrupt cache passed as checked
    assert main(["cache", "info", str(tmp_path / "other"), str(root), "--verify"]) == 2
    assert f"one cache directory, and no build options; got also ['{root}']" in capsys.readouterr().err
    # build options given to info were ignored, as if the cache were what they describe
    assert main(["cache", "info", str(root), "--dtype", "int8", "--views", "1", "--augment"]) == 2
    assert "no build options; got also ['--views', '--augment', '--dtype']" in capsys.readouterr().err
    # an unfinished build: the manifest says "building" until the last shard is written
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "status": "building", "shards": {}}))
    shard.unlink()
    assert main(["cache", "info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "unfinished build, 3 of 4 shards written" in out
    # per sample and view: the written shards' bytes over the samples they hold (5 of 6 rows), not over all 6
    written = sum(p.stat().st_size for p in root.rglob("*.safetensors")) / 2**20
    assert f"{written:.1f} MiB on disk ({written / 5:.3g} MiB per sample and view)" in out
    assert main(["cache", "info", str(tmp_path)]) == 2
    assert f"{tmp_path} is not a teacher-feature cache (no manifest.json)" in capsys.readouterr().err
    assert main(["cache", "info", str(tmp_path / "nosuch")]) == 2
    assert f"{tmp_path / 'nosuch'} is not a teacher-feature cache (there is no such folder)" in capsys.readouterr().err
    assert main(["cache", "build", str(data)]) == 2
    assert "--out DIR is required" in capsys.readouterr().err


def test_cache_info_names_gone_shard_files_and_a_manifest_damaged_by_hand(tiny_recipe, tmp_path, capsys):
    """A finished cache whose shard files were deleted was said "complete"; a manifest edited by hand gave a
    TypeError traceback (or Nones) rather than naming the field."""
    recipe = tiny_recipe("data.options.length=6")
    root = build_cache(recipe, tmp_path / "c", shard_size=2)
    for k in (0, 2):
        (root / "view0" / f"shard{k:05d}.safetensors").unlink()
    assert main(["cache", "info", str(root)]) == 0
    assert ("complete, 3 shards, but 2 of their files are gone (view0/shard00000, view0/shard00002): training "
            "refuses it; run its `sak cache build` again") in capsys.readouterr().out  # fmt: skip
    build_cache(recipe, root, shard_size=2)  # as it says: the gone files are written anew
    assert main(["cache", "info", str(root), "--verify"]) == 0
    assert "(format 3): complete, 3 shards\n" in capsys.readouterr().out
    manifest = json.loads((root / "manifest.json").read_text())
    for damage, said in (
        ({"samples": "6"}, "samples '6' (a whole number >= 0)"),
        ({"shard_size": 0}, "shard_size 0 (a whole number >= 1)"),
        ({"shards": list(manifest["shards"])}, "shards of type list (a mapping of shard name to sha256)"),
        ({"identity": {**manifest["identity"], "views": True}}, "identity.views True (a whole number >= 1)"),
        ({"identity": {**manifest["identity"], "dtype": "fp32"}}, "identity.dtype 'fp32' (fp16 or int8)"),
        ({"identity": {**manifest["identity"], "teachers": []}}, "identity.teachers of type list (a mapping)"),
        ({"identity": {**manifest["identity"], "data": "x"}}, "identity.data of type str (a mapping)"),
        ({"samples": 10**11, "shard_size": 1}, "samples 100000000000 in shards of 1, 1 view(s): more than 1000000"),
    ):
        (root / "manifest.json").write_text(json.dumps({**manifest, **damage}))
        for command in (["cache", "info", str(root)], ["cache", "info", str(root), "--verify"]):
            assert main(command) == 2
            err = capsys.readouterr().err
            assert f"{root / 'manifest.json'} is not a valid cache manifest: {said}" in err, err
        with pytest.raises(CacheError, match="is not a valid cache manifest"):
            FeatureCache(root)
    # fields only described, of the wrong kind: described as far as they go (were TypeErrors and AttributeErrors)
    teachers = {tid: {**t, "weights": None, "sha256": 5} for tid, t in manifest["identity"]["teachers"].items()}
    data = {**manifest["identity"]["data"], "content_sha256": 5}
    odd = {**manifest, "identity": {**manifest["identity"], "teachers": teachers, "data": data}, "shapes": {"x": [5]}}
    (root / "manifest.json").write_text(json.dumps(odd))
    assert main(["cache", "info", str(root)]) == 0 and "weights None" in capsys.readouterr().out
    (root / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "level_dims"}))
    assert main(["cache", "info", str(root)]) == 2
    assert "is not a valid cache manifest (it lacks level_dims)" in capsys.readouterr().err


def _flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # in the tensor data, past the header
    path.write_bytes(bytes(data))


def test_a_build_resumed_or_run_again_rebuilds_a_damaged_kept_shard(tiny_recipe, tmp_path, monkeypatch, capsys):
    """Each shard's sha256 is written beside it: a resumed build checks the shards it keeps (an interrupted
    build's, against those; a finished cache's, against its manifest) and builds a damaged one again. It used
    to record the digest of the damaged bytes, after which every check passed them."""
    recipe = tiny_recipe("data.options.length=8")
    fresh = build_cache(recipe, tmp_path / "fresh", shard_size=4)
    root = tmp_path / "c"
    _crash_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        build_cache(recipe, root, shard_size=4)
    monkeypatch.undo()
    kept = root / "view0" / "shard00000.safetensors"
    _flip_last_byte(kept)
    capsys.readouterr()
    build_cache(recipe, root, shard_size=4)
    assert "shard view0/shard00000 does not match its recorded sha256; building it again" in capsys.readouterr().out
    assert kept.read_bytes() == (fresh / "view0" / "shard00000.safetensors").read_bytes()
    FeatureCache(root).verify_all()
    _flip_last_byte(kept)  # a finished cache, built again (nothing else to write)
    (root / "view0" / "shard00000.sha256").unlink()  # the manifest's digest is enough
    build_cache(recipe, root, shard_size=4)
    assert kept.read_bytes() == (fresh / "view0" / "shard00000.safetensors").read_bytes()
    FeatureCache(root).verify_all()
    assert json.loads((root / "manifest.json").read_text()) == json.loads((fresh / "manifest.json").read_text())
    # damage in the header (a stamp's digit, the header's JSON) is damage too, not a shard of another build
    header = int.from_bytes(kept.read_bytes()[:8], "little")
    for offset in (kept.read_bytes()[8 : 8 + header].index(b'"sak_cache":"') + len(b'"sak_cache":"'), 0):
        data = bytearray(kept.read_bytes())
        data[8 + offset] = ord("0") if data[8 + offset] != ord("0") else ord("1")
        kept.write_bytes(bytes(data))
        capsys.readouterr()
        build_cache(recipe, root, shard_size=4)
        assert "shard view0/shard00000 does not match its recorded sha256; building it again" in capsys.readouterr().out
        assert kept.read_bytes() == (fresh / "view0" / "shard00000.safetensors").read_bytes()
    (root / "view0" / "shard00001.sha256").unlink()  # an older sak's unfinished build: nothing to check against
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "status": "building", "shards": {}}))
    capsys.readouterr()
    build_cache(recipe, root, shard_size=4)
    assert "shard view0/shard00001 has no recorded sha256; building it again" in capsys.readouterr().out
    (root / "view0" / "shard00001.sha256").write_bytes(b"\xe2" * 64)  # an unfinished build's file, no text: a
    (root / "manifest.json").write_text(json.dumps({**manifest, "status": "building", "shards": {}}))  # mismatch
    capsys.readouterr()
    build_cache(recipe, root, shard_size=4)
    assert "shard view0/shard00001 does not match its recorded sha256; building it again" in capsys.readouterr().out


def test_outputs_a_cache_would_store_as_something_else_are_refused():
    """A NaN (int8 stored it as 0) or an inf (int8 spread NaN over its channel), and for fp16 a value past its
    range (stored as inf): refused at build time, naming the teacher, level and shard."""
    from sak.engine.cache.builder import _check_storable

    ok, big = torch.ones(1, 3, 2, 2), torch.full((1, 3, 2, 2), 7e4)
    _check_storable((ok, big), "int8", "t", "view0/shard00000")  # int8's per-channel scales hold it
    _check_storable((torch.full((1, 3, 2, 2), 65519.0),), "fp16", "t", "view0/shard00000")  # float16 gives 65504
    with pytest.raises(CacheError, match=r"teacher 't' level 0 gave 6\.552e\+04"):
        _check_storable((torch.full((1, 3, 2, 2), 65520.0),), "fp16", "t", "view0/shard00000")  # float16 gives inf
    with pytest.raises(CacheError, match=r"teacher 't' level 1 gave 7e\+04 .* shard view0/shard00003, past float16"):
        _check_storable((ok, big), "fp16", "t", "view0/shard00003")
    for bad in (float("nan"), float("inf")):
        x = ok.clone()
        x[0, 1, 0, 0] = bad
        with pytest.raises(CacheError, match="teacher 't' level 0 gave a non-finite value"):
            _check_storable((x,), "int8", "t", "view0/shard00000")


def test_a_manifest_that_does_not_list_every_shard_is_refused(tiny_recipe, tmp_path):
    """verify_all checks what the manifest lists: a shard missing from it used to pass the start-up check and
    fail mid-training; a manifest without level_dims was a bare KeyError."""
    root = build_cache(tiny_recipe("data.options.length=8"), tmp_path / "c", shard_size=4)
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["shards"]["view0/shard00001"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"lists 1 shards where 8 samples in shards of 4 x 1 view\(s\) make 2 "
                                         r"\(no entry for view0/shard00001\)"):  # fmt: skip
        FeatureCache(root)
    del manifest["level_dims"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="is not a valid cache manifest \\(it lacks level_dims\\)"):
        FeatureCache(root)


def test_resuming_from_a_cache_rebuilt_with_other_settings_is_named(tiny_recipe, tmp_path, capsys):
    """The recipe names the cache by its path only: a checkpoint records which cache it trained from
    (cache.json), and a resume says what changed, e.g. an fp16 cache rebuilt as int8 at the same path."""
    import shutil

    root = tmp_path / "c"
    build_cache(tiny_recipe(), root, shard_size=16)
    train(tiny_recipe(f"cache.path={root}", "run.stop_at=2"))
    shutil.rmtree(root)
    build_cache(tiny_recipe(), root, shard_size=16, dtype="int8")
    capsys.readouterr()
    train(tiny_recipe(f"cache.path={root}"))
    out = capsys.readouterr().out
    assert (
        "the recipe (its teachers, or the cache it reads) differs from the one" in out
        and "cache dtype: 'fp16' -> 'int8'" in out
    )


def test_a_build_whose_teacher_gives_nan_stops_naming_it(tiny_recipe, tmp_path, monkeypatch):
    from sak.teachers.base import Teacher, TeacherOutput

    encode = Teacher.encode

    def nan_encode(self, images, dtype=None):
        out = encode(self, images, dtype)
        levels = list(out.levels)
        levels[1] = levels[1].clone()
        levels[1][0, 0, 0, 0] = float("nan")
        return TeacherOutput(tuple(levels), out.summary)

    monkeypatch.setattr(Teacher, "encode", nan_encode)
    with pytest.raises(CacheError, match=r"teacher 'vit_a' level 1 gave a non-finite value .* shard view0/shard00000"):
        build_cache(tiny_recipe("data.options.length=4"), tmp_path / "c", shard_size=4)


def test_a_finished_cache_built_again_keeps_its_intact_shards_and_stays_complete(tiny_recipe, tmp_path, monkeypatch):
    """Shards matching the manifest are kept (and get their sha256 files, as a cache of an older sak would, or
    get them written again where damaged: the new manifest takes its digests from them),
    and with nothing to write the manifest is never marked "building": stopping that run cannot break it."""
    recipe = tiny_recipe("data.options.length=8")
    root = build_cache(recipe, tmp_path / "c", shard_size=4)
    shards = sorted((root / "view0").glob("*.safetensors"))
    times = [p.stat().st_mtime_ns for p in shards]
    (root / "view0" / "shard00000.sha256").unlink()
    (root / "view0" / "shard00001.sha256").write_bytes(b"\xe2" * 64)  # damaged (no text) beside an intact shard
    statuses = []
    write = builder._write_manifest
    monkeypatch.setattr(builder, "_write_manifest", lambda m, path: statuses.append(m["status"]) or write(m, path))
    build_cache(recipe, root, shard_size=4)
    assert statuses == ["complete"]
    assert [p.stat().st_mtime_ns for p in shards] == times
    assert sorted(p.name for p in (root / "view0").glob("*.sha256")) == ["shard00000.sha256", "shard00001.sha256"]
    FeatureCache(root).verify_all()


def test_each_process_checks_the_kept_shards_it_writes(tiny_recipe, tmp_path, capsys, monkeypatch):
    """On N processes the i-th checks every N-th kept shard from the i-th, the shards it writes: the main process
    hashed them all while the others waited at a barrier that times out. Each on its share of at most 16
    threads (hash_threads), not of every CPU of a large node."""
    root = build_cache(tiny_recipe("data.options.length=8"), tmp_path / "c", shard_size=2)  # 4 shards
    plan = store.CachePlan(root, 8, 2, 1)
    for view, shard in plan.shards():
        _flip_last_byte(plan.path(view, shard))
    threads, sha256_files = [], builder.sha256_files
    monkeypatch.setattr(digest, "usable_cpus", lambda: 128)
    monkeypatch.setattr(builder, "sha256_files", lambda paths, n=None: threads.append(n) or sha256_files(paths, n))
    for index in (0, 1):
        capsys.readouterr()
        builder._drop_damaged_kept_shards(root, plan, {}, (index, 2))
        assert sorted(line.split("shard ")[1].split(" ")[0] for line in capsys.readouterr().out.splitlines()) == [
            f"view0/shard0000{k}" for k in (index, index + 2)
        ]
    assert threads == [8, 8]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # the two processes on two machines: each has its own 16
    builder._drop_damaged_kept_shards(root, plan, {}, (0, 2))
    assert threads[-1] == 16
    assert not any(plan.path(v, k).exists() for v, k in plan.shards())
