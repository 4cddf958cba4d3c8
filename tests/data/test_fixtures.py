"""The fixture writers produce the real releases' formats: read here the way the public loaders read them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.io
from PIL import Image

from sak.data.fixtures import CONTEXT_CLASSES, NYU40, main, write_nyud, write_pascal_context


@pytest.fixture(scope="module")
def pascal(tmp_path_factory):
    return write_pascal_context(tmp_path_factory.mktemp("p") / "PASCAL_MT", n_train=5, n_val=2, size=(40, 52), seed=3)


def test_pascal_files_and_formats(pascal):
    train = (pascal / "ImageSets" / "Context" / "train.txt").read_text().split()
    val = (pascal / "ImageSets" / "Context" / "val.txt").read_text().split()
    assert len(train) == 5 and len(val) == 2 and not set(train) & set(val)
    for sid in train + val:
        image = Image.open(pascal / "JPEGImages" / f"{sid}.jpg")
        assert image.format == "JPEG" and image.mode == "RGB"
        h, w = image.size[1], image.size[0]
        assert 30 <= h <= 40 and 39 <= w <= 52
        semseg = Image.open(pascal / "semseg" / "pascal-context" / f"{sid}.png")
        assert semseg.mode == "L" and set(np.unique(semseg)) <= set(range(21)) | {255}
        assert Image.open(pascal / "sal_distill" / f"{sid}.png").mode == "L"
        assert Image.open(pascal / "normals_distill" / f"{sid}.png").mode == "RGB"
        label_map = scipy.io.loadmat(pascal / "pascal-context" / "trainval" / f"{sid}.mat")["LabelMap"]
        assert label_map.shape == (h, w) and set(np.unique(label_map)) <= set(CONTEXT_CLASSES.values())
    classes = json.loads((pascal / "json" / "context_classes.json").read_text())
    assert classes["person"] == 284 and classes["tvmonitor"] == 427  # the real PASCAL-Context indices
    assert "wall" in json.loads((pascal / "json" / "nyu_classes.json").read_text())
    assert json.loads((pascal / "json" / "pascal_part.json").read_text())["15"]["luarm"] == 14


def test_pascal_part_struct_reads_positionally_as_the_reference_loaders(pascal):
    """The public loaders index `anno[0][0][1][0]` for the objects, then [1][0][0] for class_ind, [2] for
    the mask, [3] for the parts and [3][0][j][0][0] / [3][0][j][1] for each part's name and mask."""
    parts_index = json.loads((pascal / "ImageSets" / "Parts" / "train.txt").read_text())
    kinds = set()
    for sid, categories in parts_index.items():
        objects = scipy.io.loadmat(pascal / "human_parts" / f"{sid}.mat")["anno"][0][0][1][0]
        assert [int(o[1][0][0]) for o in objects] == categories
        for obj in objects:
            if obj[1][0][0] != 15:
                continue
            has_parts = len(obj[3]) != 0
            kinds.add(has_parts)
            names = [str(obj[3][0][j][0][0]) for j in range(len(obj[3][0]))] if has_parts else []
            union = np.zeros(obj[2].shape, bool)
            for j, name in enumerate(names):
                assert name in {"head", "hair", "torso", "neck", "luarm", "rlarm", "lhand", "ruleg", "llleg", "rfoot",
                                "lear", "rear", "leye", "reye", "lebrow", "rebrow", "nose", "mouth", "ruarm", "llarm",
                                "rhand", "luleg", "rlleg", "lfoot"}  # fmt: skip
                union |= obj[3][0][j][1].astype(bool)
            if names:
                assert {"torso", "head"} <= set(names)
                assert not (union & ~obj[2].astype(bool)).any()  # parts lie inside the person's mask
    assert True in kinds  # people with part annotations (train image 0, 3)


def test_writers_are_deterministic_per_seed(tmp_path):
    a = write_nyud(tmp_path / "a", 2, 1, (24, 32), seed=5)
    b = write_nyud(tmp_path / "b", 2, 1, (24, 32), seed=5)
    c = write_nyud(tmp_path / "c", 2, 1, (24, 32), seed=6)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "depth" / "0001.npy").read_bytes() != (c / "depth" / "0001.npy").read_bytes()


def test_pascal_context_writer_is_deterministic_per_seed_at_any_time(tmp_path, monkeypatch):
    """Its .mat files too: scipy writes the time of writing into the MAT header (the second write here
    happens in 1970)."""
    import time

    a = write_pascal_context(tmp_path / "a", n_train=2, n_val=1, size=(24, 32), seed=5)
    monkeypatch.setattr(time, "asctime", lambda *args: "Thu Jan  1 00:00:00 1970")
    b = write_pascal_context(tmp_path / "b", n_train=2, n_val=1, size=(24, 32), seed=5)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert any(f.suffix == ".mat" for f in files)
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert [f for f in files if (a / f).read_bytes() != (b / f).read_bytes()] == []


def test_nyud_scenes_are_geometrically_consistent(tmp_path):
    root = write_nyud(tmp_path / "NYUD_MT", 3, 1, (48, 64), seed=1)
    assert (root / "gt_sets" / "train.txt").read_text().split() == ["0001", "0002", "0003"]
    for sid in ("0001", "0002", "0003", "0004"):
        depth = np.load(root / "depth" / f"{sid}.npy")
        seg = np.asarray(Image.open(root / "segmentation" / f"{sid}.png"))
        normals = 2 * np.asarray(Image.open(root / "normals" / f"{sid}.png")).astype(np.float32) / 255 - 1
        assert depth.dtype == np.float32 and depth.shape == (48, 64) and (depth > 0).all() and depth.max() < 7
        assert set(np.unique(seg)) <= set(range(41))
        floor = seg == NYU40["floor"]
        assert floor.any() and (normals[floor][:, 1] > 0.95).all()  # floors face up
        column = depth[:, 0][floor[:, 0]]
        assert (np.diff(column) <= 1e-6).all()  # the floor comes closer towards the bottom of the image
        edges = np.asarray(Image.open(root / "edge" / f"{sid}.png"))
        assert set(np.unique(edges)) == {0, 255}


def test_command_line_writer(tmp_path, capsys):
    main(["pascal_context", str(tmp_path / "P"), "--train", "2", "--val", "1", "--size", "24", "32"])
    assert "wrote a pascal_context fixture" in capsys.readouterr().out
    assert len((tmp_path / "P" / "ImageSets" / "Context" / "train.txt").read_text().split()) == 2
