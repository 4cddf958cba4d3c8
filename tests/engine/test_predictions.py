"""The prediction file formats (`sak.engine.predictions`): what a saved file holds, the published conventions
it follows, and clear errors for a file that cannot be read or a prediction that cannot be stored."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sak.engine.predictions import (
    PredictionError,
    decode,
    encode,
    prediction_path,
    read_prediction,
    write_predictions,
)

TASKS = ("semseg", "parts", "saliency", "normals", "edges")


# ---------------------------------------------------------------------------------------------
# prediction files
# ---------------------------------------------------------------------------------------------
def sample_prediction(task: str, h: int = 5, w: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if task in ("semseg", "parts"):
        return torch.randint(0, 7, (h, w), generator=g)
    if task == "normals":
        return torch.nn.functional.normalize(torch.randn(3, h, w, generator=g), dim=0)
    if task == "depth":
        return torch.rand(1, h, w, generator=g) * 10
    return torch.rand(1, h, w, generator=g)


@pytest.mark.parametrize("task", [*TASKS, "depth"])
def test_a_saved_prediction_reads_back_as_the_in_memory_decoding(task, tmp_path):
    pred = sample_prediction(task)
    (path,) = write_predictions(tmp_path, task, ["img_1"], [pred])
    assert path == prediction_path(tmp_path, task, "img_1") and path.suffix == (".npy" if task == "depth" else ".png")
    read = read_prediction(tmp_path, task, "img_1", size=(5, 7), num_classes=7)
    expected = decode(task, encode(task, pred))
    assert read.dtype == expected.dtype and torch.equal(read, expected)
    if task == "edges":  # truncated: at most one step below, never above
        assert (read <= pred).all() and (pred - read < 1 / 255).all()
    else:
        tolerance = {"saliency": 0.5 / 255, "normals": 1 / 255, "depth": 0.0}.get(task, 0)
        torch.testing.assert_close(read.to(pred.dtype), pred, atol=tolerance, rtol=0)


def test_the_stored_values_follow_the_published_conventions():
    assert encode("saliency", torch.tensor([[[0.0, 0.2, 1.0]]])).tolist() == [[0, 51, 255]]
    # saliency rounds (nearest to the float SAK scores); edges truncate, as SAK's PNGs that SEISM reads
    assert encode("saliency", torch.tensor([[[0.5, 0.999]]])).tolist() == [[128, 255]]
    assert encode("edges", torch.tensor([[[0.5, 0.999, 1.0]]])).tolist() == [[127, 254, 255]]
    assert decode("saliency", np.array([[51]], dtype=np.uint8)).dtype == torch.float32
    assert decode("edges", np.array([[51]], dtype=np.uint8)).item() == np.float32(51) / np.float32(255)
    normals = torch.tensor([[[-1.0]], [[0.0]], [[1.0]]])  # (3, 1, 1)
    assert encode("normals", normals).tolist() == [[[0, 128, 255]]]  # v = round((n + 1) / 2 * 255)
    assert decode("normals", np.array([[[0, 255, 51]]], dtype=np.uint8))[:, 0, 0].tolist() == pytest.approx(
        [-1.0, 1.0, 2 * 51 / 255 - 1]
    )
    semseg = encode("semseg", torch.tensor([[0, 20]]))
    assert semseg.dtype == np.uint8 and decode("semseg", semseg).dtype == torch.int64
    depth = torch.tensor([[[1.2345678]]])
    assert encode("depth", depth).dtype == np.float32 and decode("depth", encode("depth", depth)).shape == (1, 1, 1)


def _bad_file(kind: str, root):
    path = prediction_path(root, "semseg", "x")
    path.parent.mkdir(parents=True)
    if kind == "no folder":
        path.parent.rmdir()
    elif kind == "unreadable":
        path.write_bytes(b"not a png")
    elif kind == "size":
        Image.fromarray(np.zeros((4, 7), np.uint8)).save(path)
    elif kind == "class":
        Image.fromarray(np.full((5, 7), 30, np.uint8)).save(path)
    elif kind == "channels":
        Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(path)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "prediction file not found (expected <id>.png under"),
        ("no folder", "no semseg/ folder of semseg predictions (expected semseg/<id>.png); leave semseg out of"),
        ("unreadable", "cannot read the PNG"),
        ("size", "prediction is 4x7, the ground truth is 5x7"),
        ("class", "class value(s) [30] out of range; expected 0..20"),
        ("channels", "expected a single-channel (H, W) map, got shape (5, 7, 3) (a colour-coded segmentation?"),
    ],
)
def test_a_bad_prediction_file_is_named_with_what_is_wrong(kind, message, tmp_path):
    path = _bad_file(kind, tmp_path)
    with pytest.raises(PredictionError) as info:
        read_prediction(tmp_path, "semseg", "x", size=(5, 7), num_classes=21)
    named = str(tmp_path) if kind == "no folder" else str(path)  # (the folder that lacks the task's)
    assert named in str(info.value) and message in str(info.value)


def test_predictions_that_cannot_be_stored_are_refused(tmp_path):
    with pytest.raises(PredictionError, match="NaN"):
        encode("depth", torch.tensor([[[float("nan")]]]))
    with pytest.raises(PredictionError, match="0..255"):
        encode("semseg", torch.tensor([[300]]))
    with pytest.raises(PredictionError, match=r"got values in \[-1, 5\]"):  # (it named only the largest, 5)
        encode("semseg", torch.tensor([[-1, 5]]))
    np.save(tmp_path / "bad.npy", np.array([[np.inf]], dtype=np.float32))
    (tmp_path / "depth").mkdir()
    shutil.move(tmp_path / "bad.npy", tmp_path / "depth" / "x.npy")
    with pytest.raises(PredictionError, match=r"depth[/\\]x\.npy: the depth array holds NaN"):
        read_prediction(tmp_path, "depth", "x")
    (tmp_path / "depth" / "x.npy").write_bytes(b"")  # a copy cut short: numpy's EOFError came through
    with pytest.raises(PredictionError, match=r"depth[/\\]x\.npy: cannot read the \.npy array"):
        read_prediction(tmp_path, "depth", "x")
    with open(tmp_path / "depth" / "x.npy", "wb") as f:  # an NpzFile: an AttributeError came through
        np.savez(f, depth=np.zeros((1, 1), np.float32))
    with pytest.raises(PredictionError, match=r"depth[/\\]x\.npy: an \.npz archive, expected one array"):
        read_prediction(tmp_path, "depth", "x")


def test_a_prediction_is_written_under_a_temporary_name_of_its_own_process(tmp_path, monkeypatch):
    """Two processes of a launch writing one file (`sak predict` runs in each) shared one temporary name: one
    renamed the other's away, and failed with FileNotFoundError."""
    import os

    from sak.engine.predictions import save_encoded

    moved = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (moved.append(str(src)), real(src, dst)))
    path = save_encoded(tmp_path, "saliency", "x", np.zeros((4, 4), np.uint8))
    assert path.is_file() and len(moved) == 1 and f".{os.getpid()}.partial" in moved[0]


@pytest.mark.parametrize("task", ["saliency", "edges", "normals", "semseg"])
def test_a_palette_png_reads_as_its_colours_except_for_class_maps(task, tmp_path):
    """A saliency PNG saved in palette mode (an image editor's export) was scored on its palette indices."""
    pred = sample_prediction(task)
    (path,) = write_predictions(tmp_path, task, ["img_1"], [pred])
    expected = read_prediction(tmp_path, task, "img_1", size=(5, 7), num_classes=7)
    with Image.open(path) as im:
        im.convert("RGB" if task == "normals" else im.mode).convert("P", palette=Image.ADAPTIVE).save(path)
    with Image.open(path) as im:
        assert im.mode == "P"
    if task == "semseg":  # written as "L": its palette copy's indices are not its classes; only check a P file reads
        assert read_prediction(tmp_path, task, "img_1", size=(5, 7)).shape == (5, 7)
        return
    assert torch.equal(read_prediction(tmp_path, task, "img_1", size=(5, 7)), expected)
    if task != "normals":
        rgb = np.zeros((5, 7, 3), np.uint8)
        rgb[..., 0] = 200
        Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(path)
        with pytest.raises(PredictionError, match=rf"a palette PNG of colours; {task} predictions are grey levels"):
            read_prediction(tmp_path, task, "img_1", size=(5, 7))
