"""Unlabelled images for stage 1: folder trees and tar shards (sak/data/images.py)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sak.data import DatasetSpec, build_dataset
from sak.data.images import DataError, decode_rgb, to_rgb

CLASSES = {"n01440764": 3, "n02102040": 2}


def picture(k: int, h: int = 30, w: int = 40) -> np.ndarray:
    """A distinct image per k: left half one colour, right half another."""
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = (10 * k, 200 - 10 * k, 50)
    image[:, w // 2 :] = (250 - 10 * k, 20, 10 * k)
    return image


@pytest.fixture
def tree(tmp_path):
    """An ImageNet-style tree: root/{train,val}/<class>/<class>_<k>.png (lossless, so pixels compare)."""
    k = 0
    for split in ("train", "val"):
        for cls, n in CLASSES.items():
            (tmp_path / split / cls).mkdir(parents=True)
            for j in range(n):
                Image.fromarray(picture(k)).save(tmp_path / split / cls / f"{cls}_{j}.png")
                k += 1
    (tmp_path / "train" / "README.txt").write_text("not an image")
    return tmp_path


def folder(root, split="train", train=True, subset=None, seed=0, **options):
    spec = DatasetSpec(root=str(root), split=split, image_size=16, train=train, seed=seed, subset=subset)
    return build_dataset("image_folder", spec, options)


def test_folder_lists_images_sorted_recursively_and_ignores_classes(tree):
    ds = folder(tree)
    assert ds.ids == ["n01440764/n01440764_0", "n01440764/n01440764_1", "n01440764/n01440764_2",
                      "n02102040/n02102040_0", "n02102040/n02102040_1"]  # fmt: skip
    s = ds[0]
    assert set(s) == {"image", "id"} and s["image"].shape == (3, 16, 16) and s["image"].dtype == torch.uint8
    assert len(folder(tree, split_subdir=False)) == 10  # both splits when reading the whole root


def test_a_folder_reached_again_through_a_link_is_listed_once_under_its_real_path(tree, tmp_path):
    """A link to a folder above it listed its images again under ever longer ids until the OS's link limit,
    and a second link to one folder listed its images twice: the same photograph under two ids. The real
    folder keeps its ids (a link added beside it must not rename them); a folder outside the tree is listed
    under the first link to it."""
    train = tree / "train"
    before = folder(tree).ids
    (train / "n01440764" / "up").symlink_to(train, target_is_directory=True)  # a loop
    (train / "again").symlink_to(train / "n02102040", target_is_directory=True)  # an alias, sorted first
    assert folder(tree).ids == before
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.fromarray(picture(9)).save(outside / "x.png")
    for name in ("b_outside", "c_outside_again"):
        (train / name).symlink_to(outside, target_is_directory=True)
    assert folder(tree).ids == sorted([*before, "b_outside/x"])
    assert folder(tree, follow_links=False).ids == before


def test_folder_training_crops_are_reproducible_and_eval_is_a_centre_crop(tree):
    a, b = folder(tree)[3]["image"], folder(tree)[3]["image"]
    assert torch.equal(a, b)
    other = folder(tree)
    other.set_epoch(4)
    assert not torch.equal(other[3]["image"], a)
    ev = folder(tree, train=False)[0]["image"]
    # centre 30x30 of a 40-wide image: 15 columns of each colour around the middle, resized to 16
    left, right = picture(0)[0, 0], picture(0)[0, -1]
    assert torch.equal(ev[:, 8, 0], torch.from_numpy(left)) and torch.equal(ev[:, 8, -1], torch.from_numpy(right))


def test_folder_subset_and_clear_errors(tree, tmp_path):
    manifest = tmp_path / "keep.txt"
    manifest.write_text("n02102040/n02102040_1\nn01440764/n01440764_0\n")
    assert folder(tree, subset=str(manifest)).ids == ["n02102040/n02102040_1", "n01440764/n01440764_0"]
    with pytest.raises(FileNotFoundError, match="split_subdir: false"):
        folder(tree, split="test")
    with pytest.raises(ValueError, match="scale must be"):
        folder(tree, scale=[0.5, 0.1])
    bad = tree / "train" / "n01440764" / "n01440764_1.png"
    bad.write_bytes(b"\x89PNG broken")
    ds = folder(tree)
    with pytest.raises(DataError, match="n01440764_1.png: cannot decode"):
        ds[1]
    skipping = folder(tree, skip_bad=True)
    assert skipping[1]["id"] == "n01440764/n01440764_2"  # the next good image stands in
    assert skipping.skipped[0][0] == "n01440764/n01440764_1"
    for epoch in range(3):  # (recorded once: it grew by one entry an epoch)
        skipping.set_epoch(epoch)
        skipping[1]
    assert len(skipping.skipped) == 1
    for f in (tree / "train").rglob("*.png"):
        f.write_bytes(b"\x89PNG broken")
    broken = folder(tree, skip_bad=True)
    with pytest.raises(DataError, match=rf"no readable image among {len(broken.ids)} tried from index 0"):
        broken[0]


def write_shards(tree, out, compress=False):
    """The tree's train images as two shards, members stored under <class>/<file>."""
    files = sorted((tree / "train").rglob("*.png"))
    for s, chunk in enumerate((files[:3], files[3:])):
        with tarfile.open(out / f"train-{s:03d}.tar{'.gz' if compress else ''}", "w:gz" if compress else "w") as tar:
            tar.add(tree / "train" / "README.txt", arcname="README.txt")
            for f in chunk:
                tar.add(f, arcname=f"{f.parent.name}/{f.name}")
    return files


def tars(root, split="train", train=False, **options):
    spec = DatasetSpec(root=str(root), split=split, image_size=16, train=train)
    return build_dataset("image_tar", spec, options)


def test_tar_shards_read_members_lazily_with_the_folder_pixels(tree, tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    write_shards(tree, out)
    ds, ref = tars(out), folder(tree, train=False)
    assert ds.ids == [f"train-000/{i}" for i in ref.ids[:3]] + [f"train-001/{i}" for i in ref.ids[3:]]
    for i in range(len(ds)):
        assert torch.equal(ds[i]["image"], ref[i]["image"])
    train = tars(out, train=True)
    loader = torch.utils.data.DataLoader(train, batch_size=5, num_workers=2)  # descriptors reopen per worker
    batch = next(iter(loader))
    assert batch["image"].shape == (5, 3, 16, 16)
    assert torch.equal(batch["image"][2], train[2]["image"])


def test_tar_shards_keep_a_bounded_number_of_descriptors_open(tree, tmp_path, monkeypatch):
    """One descriptor per shard was kept for the dataset's life: with ImageNet's 1024+ shards, past the usual
    limit of 1024 ("Too many open files")."""
    import os

    from sak.data.images import ImageTar

    out = tmp_path / "shards"
    out.mkdir()
    files = sorted((tree / "train").rglob("*.png"))
    for s, f in enumerate(files):  # one image a shard
        with tarfile.open(out / f"train-{s:03d}.tar", "w") as tar:
            tar.add(f, arcname=f"{f.parent.name}/{f.name}")
    monkeypatch.setattr(ImageTar, "OPEN_SHARDS", 2)
    ds, ref = tars(out), folder(tree, train=False)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(2):
        for i in range(len(ds)):
            assert torch.equal(ds[i]["image"], ref[i]["image"])
    assert len(ds._fds) == 2 and len(os.listdir("/proc/self/fd")) <= before + 2


def test_tar_index_cache_and_errors(tree, tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    write_shards(tree, out)
    cache = tmp_path / "index"
    first = tars(out, index_cache=str(cache))
    assert len(list(cache.glob("*.json"))) == 2
    assert tars(out, index_cache=str(cache)).ids == first.ids
    with pytest.raises(FileNotFoundError, match="no tar shards match"):
        tars(out, split="val")
    gz = tmp_path / "gz"
    gz.mkdir()
    write_shards(tree, gz, compress=True)
    with pytest.raises(DataError, match="decompress them"):
        tars(gz, shards="{split}*.tar.gz")


def test_a_damaged_member_index_is_rebuilt_and_a_cut_short_shard_is_not_called_compressed(tree, tmp_path, caplog):
    """An index_cache file damaged or edited by hand was trusted: a JSONDecodeError naming no file, members read
    out of the shard's bytes, or "hold no image members". A tar cut short was "not an uncompressed tar ...
    decompress them first"."""
    out = tmp_path / "shards"
    out.mkdir()
    write_shards(tree, out)
    cache = tmp_path / "index"
    first = tars(out, index_cache=str(cache))
    for bad in ("[[1,2]", '[["x.png", 0]]', '[["a.png", 0, 100000000]]', '[["a.png", "0", 10]]'):
        for f in cache.glob("*.json"):
            f.write_text(bad)
        assert tars(out, index_cache=str(cache)).ids == first.ids
        assert "not a member index of" in caplog.text
    shard = out / "train-000.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(DataError, match=r"train-000.tar: not a readable tar .*: cut short \(an interrupted copy\)"):
        tars(out)


def test_tar_members_with_one_id_are_an_error_naming_both(tmp_path):
    """`cls/a.jpg` and `cls/a.png` in one shard, or two `train.tar` in two folders, gave one id twice: every copy
    read the last member and the others were never read."""

    def shard(path: Path, names: list[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as tar:
            for name in names:
                data = io.BytesIO()
                Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(
                    data, format=Path(name).suffix[1:].replace("jpg", "jpeg")
                )
                info = tarfile.TarInfo(name)
                info.size = data.tell()
                data.seek(0)
                tar.addfile(info, data)

    shard(tmp_path / "one" / "train.tar", ["cls/a.jpg", "cls/a.png", "cls/b.jpg"])
    with pytest.raises(
        ValueError,
        match=r"1 image id\(s\) name more than one tar member, e.g. 'train/cls/a': .*train.tar:cls/a.jpg, .*train.tar:cls/a.png",
    ):
        tars(tmp_path / "one")
    shard(tmp_path / "two" / "x" / "train.tar", ["img0.jpg"])
    shard(tmp_path / "two" / "y" / "train.tar", ["img0.jpg"])
    with pytest.raises(ValueError, match=r"e.g. 'train/img0': .*x/train.tar:img0.jpg, .*y/train.tar:img0.jpg"):
        tars(tmp_path / "two", shards="*/{split}.tar")
    assert len(tars(tmp_path / "two", shards="x/{split}.tar")) == 1


# ---------------------------------------------------------------------------------------------
# decode_rgb: the image as displayed
# ---------------------------------------------------------------------------------------------
def test_decode_rescales_16_and_32_bit_images_instead_of_clipping(tmp_path):
    ramp = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")  # opens as I;16
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    for path, mode in [(tmp_path / "grey16.png", "I;16"), (tmp_path / "grey16.tif", "I;16B")]:
        if mode == "I;16B":
            Image.frombytes("I;16B", (16, 16), ramp.astype(">u2").tobytes()).save(path)
        with Image.open(path) as im:
            assert im.mode == mode
        out = decode_rgb(path)
        assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
        np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=2))
    as_int = Image.fromarray(ramp.astype(np.int32))  # mode I: 16-bit data in Pillow's 32-bit container
    as_float = Image.fromarray((ramp / 65535.0).astype(np.float32))  # mode F: [0, 1]
    for im in (as_int, as_float):
        np.testing.assert_array_equal(to_rgb(im)[..., 0], expected)


def test_decode_applies_exif_orientation(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255  # white left half as stored
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    im.save(tmp_path / "phone.png", exif=exif.tobytes())
    out = decode_rgb(tmp_path / "phone.png")
    assert out.shape == (40, 20, 3)  # upright: the stored left half is now on top
    assert (out[:20] == 255).all() and (out[20:] == 0).all()


def test_decode_composites_transparency_onto_white(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 255  # red hidden under alpha 0 ...
    rgba[0, 0, 3] = 255  # ... except one opaque pixel
    rgba[0, 1, 3] = 128  # and one half-transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = decode_rgb(tmp_path / "rgba.png")
    assert out[0, 0].tolist() == [255, 0, 0] and out[1, 1].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [255, 127, 127]  # half red, half white
    la = Image.fromarray(np.stack([np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8)], -1), "LA")
    assert to_rgb(la).tolist() == [[[255] * 3] * 2] * 2  # black, fully transparent: white
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 255, 0])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # palette entry 0 is transparent
    assert to_rgb(palette).tolist() == [[[255, 255, 255], [0, 255, 0]]]


def test_an_image_past_pillows_decompression_bomb_limit_is_a_data_error(tmp_path, monkeypatch):
    """Pillow's DecompressionBombError is no OSError: it escaped `skip_bad` and `verify` as a traceback."""
    from PIL import Image as PILImage

    path = tmp_path / "big.png"
    PILImage.new("RGB", (40, 30)).save(path)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 500)  # Pillow refuses more than twice the limit
    with pytest.raises(
        DataError, match=r"big.png: Image size \(1200 pixels\) exceeds limit .*PIL.Image.MAX_IMAGE_PIXELS"
    ):
        decode_rgb(path)


def test_label_and_prediction_pngs_past_the_decompression_bomb_limit_name_their_file(tmp_path, monkeypatch):
    """As images: Pillow's DecompressionBombError is no OSError, and escaped `skip_bad` and `verify`."""
    from PIL import Image as PILImage

    from sak.data.pascal_context import read_png
    from sak.engine.predictions import PredictionError, read_prediction

    path = tmp_path / "semseg" / "x.png"
    path.parent.mkdir()
    PILImage.new("L", (40, 30)).save(path)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(DataError, match=r"x.png: cannot decode the PNG \(Image size \(1200 pixels\)"):
        read_png(path, 1)
    with pytest.raises(PredictionError, match=r"x.png: cannot read the PNG \(Image size \(1200 pixels\)"):
        read_prediction(tmp_path, "semseg", "x")


def test_a_named_pipe_with_an_image_name_is_refused_not_waited_on(tree):
    """A FIFO named x.png in an image folder hung training in Image.open (and a cache's content digest in
    open): opening a pipe to read waits for a writer."""
    import os

    from sak.digest import sha256_of

    pipe = tree / "train" / "n01440764" / "zz_pipe.png"
    os.mkfifo(pipe)
    ds = folder(tree, train=False)
    index = ds.ids.index("n01440764/zz_pipe")
    with pytest.raises(DataError, match=r"zz_pipe.png: cannot decode the image \(.*is a named pipe, socket or device"):
        ds.read(index)
    with pytest.raises(OSError, match="is a named pipe, socket or device, not a file to read"):
        sha256_of(pipe)
