"""NYUD-v2 (NYUD_MT layout) read from a fixture written in the exact on-disk formats."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sak.data import DatasetSpec, build_dataset
from sak.data.fixtures import write_nyud
from sak.data.images import DataError
from sak.data.transforms import unpad

TASKS = ("semseg", "normals", "edges", "depth")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_nyud(tmp_path_factory.mktemp("nyud") / "NYUD_MT", n_train=4, n_val=2, size=(40, 56))


@pytest.fixture
def copy(root, tmp_path):
    return shutil.copytree(root, tmp_path / "NYUD_MT")


def dataset(root, split="val", train=False, tasks=TASKS, **options):
    spec = DatasetSpec(root=str(root), split=split, image_size=32, tasks=tasks, train=train)
    return build_dataset("nyud", spec, options)


def test_eval_samples_decode_each_file_format(root):
    ds = dataset(root)
    assert ds.ids == (root / "gt_sets" / "val.txt").read_text().split() and len(ds) == 2
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, 448, 576) and s["size"].tolist() == [40, 56]  # SAK's NYUD canvas
        sid = s["id"]
        seg = np.asarray(Image.open(root / "segmentation" / f"{sid}.png")).astype(np.int64)
        expected = np.where(seg == 0, 255, seg - 1)  # 40 classes, unlabelled -> ignore
        assert torch.equal(unpad(s["semseg"], s["size"]), torch.from_numpy(expected))
        depth = np.load(root / "depth" / f"{sid}.npy")
        assert torch.equal(unpad(s["depth"][0], s["size"]), torch.from_numpy(depth))
        assert (s["depth"][0, :100] == 0).all()  # padding is ignore (0) for depth
        normals = unpad(s["normals"], s["size"])
        assert ((normals.norm(dim=0) - 1).abs() < 0.02).all()  # valid everywhere in the image
        png = np.asarray(Image.open(root / "normals" / f"{sid}.png")).astype(np.float32)
        assert torch.allclose(normals, torch.from_numpy(2 * png / 255 - 1).permute(2, 0, 1))
        edges = unpad(s["edges"][0], s["size"])
        assert set(torch.unique(edges).tolist()) == {0.0, 1.0}


def test_training_crops_scale_depth_and_are_reproducible(root):
    ds = dataset(root, split="train", train=True, crop_size=[24, 32])
    s = ds[1]
    assert s["image"].shape == (3, 24, 32) and s["depth"].shape == (1, 24, 32) and "size" not in s
    assert torch.equal(dataset(root, split="train", train=True, crop_size=[24, 32])[1]["depth"], s["depth"])
    raw = np.load(root / "depth" / f"{s['id']}.npy")
    valid = s["depth"][s["depth"] > 0]
    # depth / scale with scale in [0.5, 2): every value lies within [min / 2, 2 max] of the file's
    assert valid.min() >= raw.min() / 2 - 1e-5 and valid.max() <= raw.max() * 2 + 1e-5
    no_scale = dataset(root, split="train", train=True, crop_size=[24, 32], scale_range=[1.0, 1.0])[1]
    assert set(np.unique(no_scale["depth"].numpy())) - {0.0} <= set(np.unique(raw))


def test_alternative_file_formats_of_other_releases(copy):
    """MTL-PyTorch / InvPT ship JPEG images and .npy normals and edges; the same ids read the same."""
    ref = dataset(copy)[0]
    sid = ref["id"]
    png = copy / "images" / f"{sid}.png"
    Image.open(png).save(copy / "images" / f"{sid}.jpg", quality=100)
    png.unlink()
    normals = 2 * np.asarray(Image.open(copy / "normals" / f"{sid}.png")).astype(np.float32) / 255 - 1
    np.save(copy / "normals" / f"{sid}.npy", normals)
    (copy / "normals" / f"{sid}.png").unlink()
    np.save(copy / "edge" / f"{sid}.npy", np.asarray(Image.open(copy / "edge" / f"{sid}.png")) / 255.0)
    (copy / "edge" / f"{sid}.png").unlink()
    alt = dataset(copy)[0]
    assert alt["id"] == sid
    assert torch.allclose(alt["normals"], ref["normals"]) and torch.equal(alt["edges"], ref["edges"])
    assert (alt["image"].int() - ref["image"].int()).abs().float().mean() < 3  # JPEG, quality 100


def test_one_and_sixteen_bit_edge_pngs_read_as_the_eight_bit_ones(copy):
    """Pillow gives a 1-bit PNG as bool, which / 255 read as 0.004, and a 16-bit one as values up to 65535,
    which / 255 read as up to 257."""
    ref = dataset(copy)[0]
    path = copy / "edge" / f"{ref['id']}.png"
    edges = np.asarray(Image.open(path)) > 127
    Image.fromarray(edges).convert("1").save(path)
    assert Image.open(path).mode == "1" and torch.equal(dataset(copy)[0]["edges"], ref["edges"])
    Image.fromarray(edges.astype(np.uint16) * 65535).save(path)
    assert Image.open(path).mode.startswith("I") and torch.equal(dataset(copy)[0]["edges"], ref["edges"])


def test_bad_files_are_clear_errors_or_skipped(copy):
    ids = dataset(copy, split="train").ids
    np.save(copy / "depth" / f"{ids[0]}.npy", np.zeros((3, 3), np.float32))
    seg = np.asarray(Image.open(copy / "segmentation" / f"{ids[1]}.png")).copy()
    seg[0, 0] = 41
    Image.fromarray(seg).save(copy / "segmentation" / f"{ids[1]}.png")
    ds = dataset(copy, split="train")
    with pytest.raises(DataError, match=rf"depth/{ids[0]}.npy: array of shape \(3, 3\), expected \(40, 56\)"):
        ds[0]
    with pytest.raises(DataError, match=rf"segmentation/{ids[1]}.png: value\(s\) \[41\] out of range"):
        ds[1]
    with pytest.raises(DataError, match="depth"):
        dataset(copy, split="train", verify=True)
    kept = dataset(copy, split="train", skip_bad=True)
    assert kept.ids == ids[2:] and [i for i, _ in kept.skipped] == ids[:2]
    np.save(copy / "depth" / f"{ids[2]}.npy", np.full((40, 56), "x"))  # strings: a TypeError, not a DataError
    with pytest.raises(DataError, match=rf"depth/{ids[2]}.npy: an array of <U1, expected numbers"):
        dataset(copy, split="train")[2]
    (copy / "depth" / f"{ids[2]}.npy").write_bytes(b"")  # a copy cut short: an EOFError, not a DataError
    with pytest.raises(DataError, match=rf"depth/{ids[2]}.npy: cannot read the .npy array"):
        dataset(copy, split="train")[2]
    with open(copy / "depth" / f"{ids[2]}.npy", "wb") as f:  # np.load gave an NpzFile: an AttributeError
        np.savez(f, depth=np.zeros((40, 56), np.float32))
    with pytest.raises(DataError, match=rf"depth/{ids[2]}.npy: an .npz archive, expected one array"):
        dataset(copy, split="train")[2]
    with pytest.raises(ValueError, match="eval_size must be"):
        dataset(copy, eval_size=[448])


def test_npy_targets_out_of_their_range_are_refused_by_name(copy):
    """0/255 edges saved as .npy trained on with every edge pixel read as the ignore value (255); normals in
    0..255 gave a normals loss of 490; depth in millimetres 2698: all trained without a word."""
    sid = dataset(copy)[0]["id"]
    edges = np.asarray(Image.open(copy / "edge" / f"{sid}.png")).astype(np.float32)  # 0 / 255
    np.save(copy / "edge" / f"{sid}.npy", edges)
    (copy / "edge" / f"{sid}.png").unlink()
    with pytest.raises(DataError, match=rf"edge/{sid}.npy: values from 0 to 255, expected edge values .* in \[0, 1\]"):
        dataset(copy)[0]
    np.save(copy / "edge" / f"{sid}.npy", edges / 255)
    normals = np.asarray(Image.open(copy / "normals" / f"{sid}.png")).astype(np.float32)
    np.save(copy / "normals" / f"{sid}.npy", normals)
    (copy / "normals" / f"{sid}.png").unlink()
    with pytest.raises(DataError, match=rf"normals/{sid}.npy: values from .* expected unit normals .* in \[-1, 1\]"):
        dataset(copy)[0]
    np.save(copy / "normals" / f"{sid}.npy", 2 * normals / 255 - 1)
    depth = np.load(copy / "depth" / f"{sid}.npy")
    np.save(copy / "depth" / f"{sid}.npy", depth * 1000)
    with pytest.raises(DataError, match=rf"depth/{sid}.npy: depth up to .*, expected metres .* millimetres\?"):
        dataset(copy)[0]
    np.save(copy / "depth" / f"{sid}.npy", depth)
    assert dataset(copy)[0]["id"] == sid


def test_image_at_is_the_samples_image(root):
    for split, train in (("train", True), ("val", False)):
        data = dataset(root, split=split, train=train)
        for epoch in (0, 1):
            data.set_epoch(epoch)
            assert all(torch.equal(data.image_at(i), data[i]["image"]) for i in range(len(data))), (split, epoch)
