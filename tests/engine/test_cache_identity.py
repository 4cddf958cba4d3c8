"""The teacher-feature cache's identity: what the cached features depend on (teachers, their options and
precision, the data and its content), so that a cache built for other teachers or data is refused by name."""

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed
from PIL import Image
from safetensors.torch import save_file

from sak.data import DatasetSpec, build_dataset
from sak.data.fixtures import write_pascal_context
from sak.engine.build import build_loader, build_teachers
from sak.engine.cache import (
    CacheError,
    FeatureCache,
    build_cache,
    identity,
    training_dataset,
)
from sak.engine.cache.identity import data_options
from sak.engine.cache.store import describe
from sak.engine.trainer import open_cache

from .test_cache import pascal_semseg


def test_every_teacher_option_and_its_metadata_are_in_the_identity(tiny_recipe, tmp_path):
    """A ViT with 4 heads instead of 2 has the same parameter count and levels but other outputs; CLIP's
    center_crop changes its preprocessing. Both used to give the same identity."""
    common = ["data.options.length=4"]
    root = build_cache(tiny_recipe(*common), tmp_path / "c", shard_size=4)
    heads = tiny_recipe(*common, "teachers.1.options.model_kwargs.num_heads=4", f"cache.path={root}")
    set_seed(heads.run.seed)
    with pytest.raises(CacheError, match=r"stale cache .*teachers\.vit_b\.options\.model_kwargs\.num_heads: cache has 2, "
                                         r"recipe gives 4.*rebuild it with `sak cache build"):  # fmt: skip
        open_cache(heads, build_teachers(heads, torch.device("cpu")))

    clip = ["teachers.0.name=clip", "teachers.0.key=clip", "teachers.0.options={source: timm, model: vit_base_patch16_clip_224, "
            "model_kwargs: {embed_dim: 32, depth: 2, num_heads: 2, img_size: 64}}"]  # fmt: skip

    def ident(*overrides):
        recipe = tiny_recipe(*common, *clip, *overrides)
        set_seed(recipe.run.seed)
        return identity(recipe, build_teachers(recipe, torch.device("cpu")), 1, False, "fp16")

    default, cropped = ident(), ident("teachers.0.options.center_crop=true")
    assert default["teachers"]["clip"]["options"]["center_crop"] is False
    assert cropped["teachers"]["clip"]["options"]["center_crop"] is True
    assert cropped["teachers"]["clip"]["extra"]["center_crop"] is True  # the teacher's metadata is there too
    assert ident("teachers.0.options.center_crop=false") == default  # a default written out changes nothing


def test_data_options_written_out_at_their_defaults_name_the_same_cache(tiny_recipe, tmp_path):
    """`data.options.classes: 5` is the synthetic dataset's default: writing it out, or leaving it out, gives the
    same data, so the cache is accepted either way (it was refused as stale: "cache has None, recipe gives 5");
    another value is still refused. A manifest of an older sak, which stored the default as written, too."""
    root = build_cache(tiny_recipe("data.options.length=4"), tmp_path / "c", shard_size=4)

    def open_with(*overrides):
        recipe = tiny_recipe("data.options.length=4", *overrides, f"cache.path={root}")
        set_seed(recipe.run.seed)
        return open_cache(recipe, build_teachers(recipe, torch.device("cpu")))

    open_with("data.options.classes=5")
    with pytest.raises(CacheError, match=r"stale cache .*data\.options\.classes: cache has None, recipe gives 6"):
        open_with("data.options.classes=6")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["identity"]["data"]["options"] = {"length": 4, "classes": 5}
    (root / "manifest.json").write_text(json.dumps(manifest))
    open_with()
    open_with("data.options.classes=5")


def test_a_cache_of_an_older_sak_with_default_options_written_out_can_be_built_on(tiny_recipe, tmp_path, monkeypatch):
    """Training took such a cache, `sak cache build` over it (to resume or top it up) refused it: "cache has 4,
    this build gives None". It builds on under the cache's own identity, which its shards' stamps hold."""
    identity_module = sys.modules["sak.engine.cache.identity"]  # (the package's `identity` is the function)

    monkeypatch.setattr(
        identity_module, "data_options", lambda name, options, augment=None: options
    )  # as sak before 11-28
    root = build_cache(tiny_recipe("data.options.length=4", "data.options.classes=5"), tmp_path / "c", shard_size=2)
    monkeypatch.undo()
    before = json.loads((root / "manifest.json").read_text())
    assert before["identity"]["data"]["options"] == {"length": 4, "classes": 5}
    (root / "view0" / "shard00001.safetensors").unlink()  # an interrupted build, to resume
    build_cache(tiny_recipe("data.options.length=4"), root, shard_size=2)
    assert json.loads((root / "manifest.json").read_text()) == before
    recipe = tiny_recipe("data.options.length=4", f"cache.path={root}")
    set_seed(recipe.run.seed)
    open_cache(recipe, build_teachers(recipe, torch.device("cpu")))


def test_an_augmented_cache_crops_as_training_does_with_the_recipes_tasks(tiny_recipe, tmp_path):
    """PASCAL-Context picks its training crop with the semseg labels (cat_max_ratio) when they are loaded:
    the cache must load them as training does, or its views are of other crops."""
    data = write_pascal_context(tmp_path / "PASCAL_MT", n_train=4, n_val=1, size=(48, 64))
    common = pascal_semseg(data)
    recipe = tiny_recipe(*common)

    def images(tasks, epoch):
        spec = DatasetSpec(root=str(data), split="train", image_size=64, tasks=tasks, train=True, seed=0)
        dataset = build_dataset("pascal_context", spec, {})
        dataset.set_epoch(epoch)
        return torch.stack([dataset[i]["image"] for i in range(len(dataset))])

    assert not torch.equal(images((), 0), images(("semseg",), 0))  # the labels do move this fixture's crops
    root = build_cache(recipe, tmp_path / "c", views=2, augment=True, shard_size=4)
    cache = FeatureCache(root)
    set_seed(recipe.run.seed)
    teachers = build_teachers(recipe, torch.device("cpu"))
    loader = build_loader(recipe, recipe.data.split, train=True, augment=True)  # as the trainer builds it
    loader.dataset.views = cache.views
    for epoch in range(2):
        loader.dataset.set_epoch(epoch)
        batch = [loader.dataset[i] for i in range(4)]
        got = cache.lookup([s["index"] for s in batch], epoch=epoch)
        for tid, teacher in teachers.items():
            online = teacher.encode(torch.stack([s["image"] for s in batch]))
            for a, b in zip(got[tid].levels, online.levels, strict=True):
                assert torch.equal(a, b.half().float())
    assert cache.manifest["identity"]["data"]["tasks"] == ["semseg"]
    # saliency moves no crop: the same views, accepted; without semseg the crops are others
    open_cache(tiny_recipe(*common, "tasks=[{name: semseg, channels: 21}, {name: saliency}]", f"cache.path={root}"),
               teachers)  # fmt: skip
    other = tiny_recipe(*common, "tasks=[{name: saliency}]", f"cache.path={root}")
    with pytest.raises(CacheError, match=r"data\.tasks: cache has \['semseg'\], recipe gives \[\]"):
        open_cache(other, teachers)


class FolderCache:
    """A folder of random PNG images (`image(name)` writes one more), a cache built over it, and the recipe
    that trains from that cache with its teachers."""

    def __init__(self, tiny_recipe, tmp_path, names: list[str]) -> None:
        self.folder = tmp_path / "images" / "train"
        self.folder.mkdir(parents=True)
        self.rng = np.random.default_rng(0)
        for name in names:
            self.image(name)
        common = ["data.name=image_folder", f"data.root={self.folder.parent}", "data.options={}"]
        self.root = build_cache(tiny_recipe(*common), tmp_path / "c", shard_size=4)
        self.recipe = tiny_recipe(*common, f"cache.path={self.root}")
        set_seed(self.recipe.run.seed)
        self.teachers = build_teachers(self.recipe, torch.device("cpu"))

    def image(self, name: str) -> None:
        Image.fromarray(self.rng.integers(0, 255, (70, 80, 3), dtype=np.uint8)).save(self.folder / name)

    def open(self):
        return open_cache(self.recipe, self.teachers)


def test_the_datasets_samples_and_ids_are_in_the_identity(tiny_recipe, tmp_path):
    """An image added to (or renamed in) a folder shifts the indices the cache is read by."""
    built = FolderCache(tiny_recipe, tmp_path, [f"im{i}.png" for i in range(1, 5)])
    folder, root = built.folder, built.root
    built.open()  # unchanged: accepted
    (folder / "im4.png").rename(folder / "im0.png")  # same count, another order
    with pytest.raises(CacheError, match=r"stale cache .*data\.ids_sha256: cache has '[0-9a-f]{64}'") as error:
        built.open()
    # named by file, not by position (which named every file after the renamed one as changed)
    assert f"1 file(s) not in the build: {folder / 'im0.png'}; 1 file(s) of the build gone: {folder / 'im4.png'}" in (
        str(error.value)
    )
    assert "changed since the build" not in str(error.value)
    manifest = json.loads((root / "manifest.json").read_text())  # an older sak's digests: a list in file order
    (root / "manifest.json").write_text(json.dumps({**manifest, "content": list(manifest["content"].values())}))
    with pytest.raises(CacheError, match=r"data\.ids_sha256") as error:
        built.open()
    assert "file(s)" not in str(error.value)  # paired by position only while the ids are the same
    built.image("im5.png")
    with pytest.raises(CacheError, match=r"data\.samples: cache has 4, recipe gives 5"):
        built.open()
    with pytest.raises(CacheError, match=rf"cache {root}: sample index 4 is out of range: the cache holds 4 samples"):
        FeatureCache(root).rows(4, epoch=0)


def test_an_image_replaced_under_its_own_name_is_named_and_refused(tiny_recipe, tmp_path):
    """Same ids, same count: only the content digest tells that the features are of another picture."""
    built = FolderCache(tiny_recipe, tmp_path, [f"im{i}.png" for i in range(3)])
    folder = built.folder
    before = os.stat(folder / "im1.png")
    built.image("im1.png")
    os.utime(folder / "im1.png", ns=(before.st_atime_ns, before.st_mtime_ns))  # same name, same time stamp
    with pytest.raises(
        CacheError,
        match=rf"stale cache .*data\.content_sha256: cache has '[0-9a-f]{{64}}'.*1 of 3 file\(s\) changed since "
        rf"the build: {folder / 'im1.png'}; rebuild it",
    ):
        built.open()


def test_a_changed_file_is_named_however_data_root_is_written(tiny_recipe, tmp_path, monkeypatch):
    """`images` at the build and `<tmp>/images` now are one folder (the identity says so): its files were listed
    as all gone and all new, and the one that changed was not named."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "images" / "train"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (70, 80, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    common = ["data.name=image_folder", "data.options={}"]
    root = build_cache(tiny_recipe(*common, "data.root=images"), tmp_path / "c", shard_size=4)
    Image.fromarray(rng.integers(0, 255, (70, 80, 3), dtype=np.uint8)).save(folder / "im1.png")
    recipe = tiny_recipe(*common, f"data.root={tmp_path / 'images'}", f"cache.path={root}")
    set_seed(recipe.run.seed)
    changed = rf"1 of 3 file\(s\) changed since the build: {re.escape(str(folder / 'im1.png'))}; rebuild it"
    with pytest.raises(CacheError, match=changed):
        open_cache(recipe, build_teachers(recipe, torch.device("cpu")))
    manifest = json.loads((root / "manifest.json").read_text())  # an older sak kept the names as data.root wrote them
    assert all(Path(name).is_absolute() for name in manifest["content"])
    manifest["content"] = {os.path.relpath(k): v for k, v in manifest["content"].items()}
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=changed):
        open_cache(recipe, build_teachers(recipe, torch.device("cpu")))


def test_a_seed_that_changes_no_feature_shares_the_cache(tiny_recipe, tmp_path):
    """Images from files, un-augmented, teachers from weight files: another run.seed changes no cached feature, and
    a seed sweep shares one cache (it was refused as stale); with teachers of random weights it draws others."""
    folder = tmp_path / "images" / "train"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (70, 80, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    common = ["data.name=image_folder", f"data.root={folder.parent}", "data.options={}"]
    set_seed(0)
    for i, teacher in enumerate(build_teachers(tiny_recipe(*common), torch.device("cpu")).values()):
        save_file(teacher.model.state_dict(), str(tmp_path / f"t{i}.safetensors"))
    files = [f"teachers.{i}.weights={tmp_path / f't{i}.safetensors'}" for i in range(2)]
    files.append("teachers.1.options.model=vit_small_patch16_224.augreg_in1k")  # (a file: the tag says its mean / std)
    for weights, shared in ((files, True), ([], False)):
        root = build_cache(tiny_recipe(*common, *weights), tmp_path / f"c{len(weights)}", shard_size=4)
        recipe = tiny_recipe(*common, *weights, "run.seed=1", f"cache.path={root}")
        set_seed(recipe.run.seed)
        teachers = build_teachers(recipe, torch.device("cpu"))
        if shared:
            assert open_cache(recipe, teachers) is not None
            assert "any seed (it changes none of these features)" in "\n".join(describe(root))
            manifest = json.loads((root / "manifest.json").read_text())  # an older sak recorded the seed always
            manifest["identity"]["data"]["seed"] = 0
            (root / "manifest.json").write_text(json.dumps(manifest))
            assert open_cache(recipe, teachers) is not None
        else:
            with pytest.raises(CacheError, match=r"data\.seed: cache has 0, recipe gives 1"):
                open_cache(recipe, teachers)


def test_augmented_caches_also_record_the_labels_that_choose_the_crops(tiny_recipe, tmp_path):
    """PASCAL-Context's semseg labels move the training crops (cat_max_ratio): an edited label file makes an
    augmented cache stale, but not a cache of the un-augmented images, whose features it does not touch."""
    data = write_pascal_context(tmp_path / "PASCAL_MT", n_train=3, n_val=1, size=(48, 64))
    common = pascal_semseg(data)
    plain = build_cache(tiny_recipe(*common), tmp_path / "plain", shard_size=4)
    augmented = build_cache(tiny_recipe(*common), tmp_path / "aug", shard_size=4, augment=True)
    assert len(FeatureCache(plain)._content) == 3 and len(FeatureCache(augmented)._content) == 6
    dataset = training_dataset(tiny_recipe(*common), augment=True)
    label = dataset.files[dataset.ids[0]]["semseg"]
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(label)
    for root, stale in ((plain, False), (augmented, True)):
        recipe = tiny_recipe(*common, f"cache.path={root}")
        set_seed(recipe.run.seed)
        teachers = build_teachers(recipe, torch.device("cpu"))
        if stale:
            with pytest.raises(CacheError, match=rf"1 of 6 file\(s\) changed since the build: {label}"):
                open_cache(recipe, teachers)
        else:
            open_cache(recipe, teachers)


def test_an_augmented_cache_of_other_tasks_names_the_tasks_not_label_files_as_gone(tiny_recipe, tmp_path):
    """Without semseg, its label files are no longer digested: they were listed as "file(s) of the build gone"."""
    data = write_pascal_context(tmp_path / "PASCAL_MT", n_train=2, n_val=1, size=(48, 64))
    root = build_cache(tiny_recipe(*pascal_semseg(data)), tmp_path / "aug", shard_size=4, augment=True)
    recipe = tiny_recipe(*pascal_semseg(data), "tasks=[{name: saliency}]", f"cache.path={root}")
    with pytest.raises(CacheError, match=r"data\.tasks: cache has \['semseg'\], recipe gives \[\]") as error:
        open_cache(recipe, build_teachers(recipe, torch.device("cpu")))
    assert "file(s)" not in str(error.value)


def test_an_augmented_cache_of_another_augmentation_revision_is_refused(tiny_recipe, tmp_path, monkeypatch):
    """The training augmentation's arithmetic changed (float64 rescaling, HSV as OpenCV's): the views an older
    augmented cache holds are not the images training now makes. The revision is recorded, and compared."""
    from sak.data.pascal_context import PascalContext

    data = write_pascal_context(tmp_path / "PASCAL_MT", n_train=2, n_val=1, size=(48, 64))
    common = pascal_semseg(data)
    root = build_cache(tiny_recipe(*common), tmp_path / "aug", shard_size=4, augment=True)
    assert FeatureCache(root).manifest["identity"]["data"]["augmentation"] == PascalContext.augmentation
    monkeypatch.setattr(PascalContext, "augmentation", "dense-next")
    recipe = tiny_recipe(*common, f"cache.path={root}")
    with pytest.raises(CacheError, match="data.augmentation: cache has 'dense-4', recipe gives 'dense-next'"):
        open_cache(recipe, build_teachers(recipe, torch.device("cpu")))


def test_teachers_compiled_or_channels_last_are_in_the_identity(tiny_recipe):
    """Both run other kernels (other rounding); channels-last only changes convolutional teachers."""
    conv = ["teachers.1.options={model: convnext_atto, model_kwargs: {depths: [1, 1, 1, 1], dims: [8, 8, 16, 16]}}"]

    def ident(*overrides):
        recipe = tiny_recipe("data.options.length=4", *overrides)
        set_seed(recipe.run.seed)
        return identity(recipe, build_teachers(recipe, torch.device("cpu")), 1, False, "fp16")

    default = ident(*conv)
    assert default["teachers"]["vit_a"]["channels_last"] is False
    assert default["teachers"]["vit_b"]["channels_last"] is True
    assert ident(*conv, "precision.channels_last=false")["teachers"]["vit_b"]["channels_last"] is False
    assert ident("precision.channels_last=false") == ident()  # ViTs alone: the switch changes nothing
    assert default["compile_teachers"] is False
    assert ident(*conv, "precision.compile_teachers=true")["compile_teachers"] is True
    # the max-autotune modes are recorded for compiled teachers only (they may pick other kernels); the default
    # and reduce-overhead (the default's kernels, replayed) leave no key, so that older caches still match
    assert "compile_mode" not in ident(*conv, "precision.compile_teachers=true")
    assert "compile_mode" not in ident("precision.compile_teachers=true", "precision.compile_mode=reduce-overhead")
    tuned = ident("precision.compile_teachers=true", "precision.compile_mode=max-autotune")
    assert tuned["compile_mode"] == "max-autotune"
    assert "compile_mode" not in ident("precision.compile_student=true", "precision.compile_mode=max-autotune")


def test_options_of_the_path_a_cache_does_not_hold_do_not_make_it_stale(tiny_recipe, tmp_path):
    """An augmented cache holds training crops, which `eval_size` (or `verify`) does not change; one of
    un-augmented images holds the evaluation samples, which crop_size, flip and the rest do not change. Both used
    to be refused as stale for them, a manifest of an older sak, which recorded them, too."""
    data = write_pascal_context(tmp_path / "PASCAL_MT", n_train=2, n_val=1, size=(48, 64))
    common = pascal_semseg(data)
    plain = build_cache(tiny_recipe(*common), tmp_path / "plain", shard_size=4)
    augmented = build_cache(tiny_recipe(*common), tmp_path / "aug", shard_size=4, augment=True)
    crop, flip, canvas = "data.options.crop_size=[32, 32]", "data.options.flip=false", "data.options.eval_size=[64, 80]"

    def open_with(root, *overrides):
        recipe = tiny_recipe(*common, *overrides, f"cache.path={root}")
        set_seed(recipe.run.seed)
        open_cache(recipe, build_teachers(recipe, torch.device("cpu")))

    open_with(plain, crop, flip, "data.options.photometric=false", "data.options.verify=true")
    # nor do options that change no sample (a sample skip_bad drops changes the ids, which are checked), nor
    # another spelling of the same data.root
    open_with(plain, "data.options.skip_bad=true", f"data.root={data}/", f"data.root={data}/./")
    open_with(augmented, "data.options.skip_bad=true", f"data.root={os.path.relpath(data)}")
    assert data_options("image_tar", {"index_cache": "/x", "shards": "a*.tar"}, augment=True) == {"shards": "a*.tar"}
    assert data_options("image_tar", {"index_cache": "/x"}, augment=False) == {}
    with pytest.raises(CacheError, match=r"data\.options\.eval_size: cache has None, recipe gives \[64, 80\]"):
        open_with(plain, canvas)
    open_with(augmented, canvas, "data.options.verify=true")
    with pytest.raises(CacheError, match=r"data\.options\.crop_size: cache has None, recipe gives \[32, 32\]"):
        open_with(augmented, crop)
    manifest = json.loads((augmented / "manifest.json").read_text())
    manifest["identity"]["data"]["options"] = {"eval_size": [64, 80], "verify": True}
    manifest["identity"]["data"]["root"] = f"{os.path.relpath(data)}/"  # as an older sak stored it: as written
    (augmented / "manifest.json").write_text(json.dumps(manifest))
    open_with(augmented)


def test_n_processes_hash_every_nth_file_and_pool_the_digests(tmp_path, monkeypatch):
    """Every process of a launch hashed every image file of the training split at each start (N reads of the
    data); within `digest_share(i, N)` it hashes its share and the lists pool into the one-process list."""
    import sak.data.base as base
    from sak.data.base import digest_share, file_digests
    from sak.engine.cache.identity import pool_digests

    paths = []
    for i in range(5):
        paths.append(tmp_path / f"f{i}.bin")
        paths[-1].write_bytes(bytes([i]) * 100)
    whole = file_digests(paths)
    hashed: list[str] = []
    threads: list[int] = []
    real = base.sha256_files
    monkeypatch.setattr(
        base, "sha256_files", lambda files, n=None: hashed.extend(files) or threads.append(n) or real(files, n)
    )
    monkeypatch.setattr("sak.digest.usable_cpus", lambda: 64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # the two processes on two machines: 16 threads each
    shares = []
    for index in range(2):
        with digest_share(index, 2):
            shares.append(file_digests(paths))
    assert hashed == [str(p) for p in paths[0::2] + paths[1::2]]  # each file once, by one process
    assert threads == [16, 16]
    assert [d for _, d in shares[0]][1::2] == ["", ""] and pool_digests(shares) == whole
    assert file_digests(paths[:1]) == whole[:1]  # outside the share: every file
    assert pool_digests([None, None]) is None
    with pytest.raises(ValueError, match="the processes' datasets list other files"):
        pool_digests([whole, whole[:4]])


def test_the_ids_digest_takes_a_plugin_s_ids_that_are_not_strings():
    """Every training start digests the split's ids now (a resume checks them): a plug-in dataset's numpy ints
    or paths made json.dumps raise a TypeError, and the training with them."""
    import hashlib
    import json
    from pathlib import Path
    from types import SimpleNamespace

    import numpy as np

    from sak.engine.cache import ids_digest

    assert ids_digest(SimpleNamespace(ids=[np.int64(3), Path("a/b")])) == ids_digest(SimpleNamespace(ids=["3", "a/b"]))
    assert ids_digest(SimpleNamespace(ids=["x", "y"])) == hashlib.sha256(json.dumps(["x", "y"]).encode()).hexdigest()


def test_teacher_weights_replaced_under_their_file_name_are_named_and_refused(tiny_recipe, tmp_path):
    """The same `weights` path and options: only the file's sha256, in the teacher's metadata, tells that the
    cached features are of other weights."""
    import timm

    weights = tmp_path / "vit_a.safetensors"

    def write(seed: int) -> None:
        torch.manual_seed(seed)
        kwargs = {"embed_dim": 48, "depth": 4, "num_heads": 2, "img_size": 56}  # tests/tiny.yaml's vit_a
        save_file(timm.create_model("vit_small_patch14_dinov2", num_classes=0, **kwargs).state_dict(), str(weights))

    write(0)
    common = ["data.options.length=4", f"teachers.0.weights={weights}"]
    root = build_cache(tiny_recipe(*common), tmp_path / "c", shard_size=4)
    write(1)
    recipe = tiny_recipe(*common, f"cache.path={root}")
    with pytest.raises(CacheError, match=r"stale cache .*teachers\.vit_a\.sha256: cache has '[0-9a-f]{64}', recipe "
                                         r"gives '[0-9a-f]{64}'"):  # fmt: skip
        open_cache(recipe, build_teachers(recipe, torch.device("cpu")))
