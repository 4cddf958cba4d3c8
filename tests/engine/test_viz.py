"""`sak viz features` (a student's features beside its teachers') and `sak viz preds` (predictions in colour)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sak.cli import main
from sak.engine import train
from sak.engine.predictions import write_predictions
from sak.engine.viz import GAP, colour_predictions, pca_rgb
from sak.tasks import create_task

from ..conftest import TINY

STEPS = ["schedule.max_steps=2", "eval.batches=1", "loss.normalize=standardize"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run trained on normalised targets (its features are drawn after denormalising)."""
    from accelerate.state import AcceleratorState, GradientState

    from sak.config import load_recipe

    out = tmp_path_factory.mktemp("viz")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    recipe = load_recipe(TINY, [f"run.output_dir={out}", *STEPS])
    train(recipe)
    return recipe.run_dir


def viz_features(run_dir, out, *more):
    return main(["viz", "features", str(TINY), f"run.output_dir={run_dir.parent}", *STEPS,
                 "--checkpoint", str(run_dir), "--out", str(out), *more])  # fmt: skip


def test_viz_features_draws_a_row_per_image_from_a_run_or_its_checkpoint(run, tmp_path, capsys):
    assert viz_features(run, tmp_path / "four.png") == 0
    assert f"wrote {tmp_path / 'four.png'}" in capsys.readouterr().out
    checkpoint = next((run / "checkpoints").iterdir())
    assert viz_features(checkpoint, tmp_path / "one.png", "--images", "1", "--level", "0") == 0
    with Image.open(tmp_path / "four.png") as four, Image.open(tmp_path / "one.png") as one:
        assert four.width == one.width and four.height > 3 * one.height  # 1 + 2 columns per teacher; rows
    capsys.readouterr()
    # more images than the split holds: all drawn, and said (the split's 8 were drawn silently for --images 64)
    assert viz_features(run, tmp_path / "all.png", "--images", "64", "eval.split=val", "data.options.length=3") == 0
    assert "note: split 'val' has 3 image(s); drawing them all, not the 64 asked" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*partial*"))


def test_viz_features_refuses_what_cannot_be_drawn_naming_it(run, tmp_path, capsys):
    assert viz_features(run, tmp_path / "x.png", "--images", "65") == 2  # (one batch, a figure too tall to save)
    assert "--images 65: draw 1 to 64 images" in capsys.readouterr().err
    assert viz_features(run, tmp_path / "x.png", "--level", "4") == 2
    assert "--level 4: the teachers have {'vit_a': 4, 'vit_b': 4} levels" in capsys.readouterr().err
    weights = tmp_path / "alone" / "model.safetensors"  # the weights without the statistics saved beside them
    weights.parent.mkdir()
    shutil.copy(next((run / "checkpoints").iterdir()) / "model.safetensors", weights)
    assert viz_features(weights, tmp_path / "x.png") == 2
    err = capsys.readouterr().err
    assert "target_normalizers.safetensors: not found" in err and "loss.normalize 'standardize'" in err
    assert main(["export", str(TINY), f"run.output_dir={run.parent}", *STEPS, "--from", str(run),
                 "--out", str(tmp_path / "export")]) == 0  # fmt: skip
    assert viz_features(tmp_path / "export", tmp_path / "x.png") == 2
    assert "is an export (sak export), which keeps no aligners" in capsys.readouterr().err
    assert viz_features(run, tmp_path / "x.png", "student.model_kwargs.embed_dim=48") == 2
    assert "the weights do not make the recipe's student" in capsys.readouterr().err
    assert main(["viz", "features", str(TINY), "--out", str(tmp_path / "x.png")]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err
    assert viz_features(run, tmp_path) == 2
    assert f"--out {tmp_path}: a folder; give the PNG's file name" in capsys.readouterr().err
    # (a .jpg got PNG bytes; under a file it failed after the teachers ran, naming a temporary file)
    (tmp_path / "afile").write_text("")
    for out, said in ((tmp_path / "x.jpg", "sak viz features writes a PNG; give a file name ending in .png"),
                      (tmp_path / "afile" / "f.png", f"{tmp_path / 'afile'} is a file")):  # fmt: skip
        assert viz_features(run, out) == 2
        assert f"--out {out}: {said}" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.jpg").exists()


def test_pca_rgb_draws_maps_of_fewer_than_three_channels():
    maps = pca_rgb(torch.randn(2, 2, 4, 5), torch.randn(2, 2, 4, 5))
    assert [tuple(m.shape) for m in maps] == [(2, 4, 5, 3)] * 2 and all(m.isfinite().all() for m in maps)


def test_pca_rgb_is_the_exact_top_three_components_whatever_the_global_rng():
    """torch.pca_lowrank's random projection gave rough components whose signs, so the colours, followed the
    global RNG (a real teacher's third component at cosine +0.97 under one seed, -1.00 under another)."""
    g = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]  # orthonormal columns
    spread = torch.tensor([8.0, 4.0, 2.0] + [0.5] * 13)  # known top three: the first three columns
    x = (torch.randn(2, 6, 7, 16, generator=g) * spread) @ directions.T
    maps = x.permute(0, 3, 1, 2)
    torch.manual_seed(1)
    first = pca_rgb(maps)[0]
    torch.manual_seed(2)
    assert torch.equal(pca_rgb(maps)[0], first)
    flat = x.reshape(-1, 16) - x.reshape(-1, 16).mean(0)
    exact = torch.linalg.svd(flat, full_matrices=False).Vh[:3].T  # (16, 3)
    exact = exact * torch.sign(exact.gather(0, exact.abs().argmax(0, keepdim=True)))
    p = flat @ exact
    lo, hi = p.quantile(0.01, dim=0), p.quantile(0.99, dim=0)
    expected = ((p - lo) / (hi - lo + 1e-8)).clamp(0, 1).reshape(2, 6, 7, 3)
    torch.testing.assert_close(first, expected, atol=1e-4, rtol=0)


def test_viz_features_builds_its_teachers_with_the_runs_seed_whatever_the_global_rng(run, tmp_path):
    """Random-weight teachers (this recipe's) were built without the run's seed: others than the run's, and
    another picture at every call."""
    torch.manual_seed(123)
    assert viz_features(run, tmp_path / "a.png", "--images", "1") == 0
    torch.manual_seed(456)
    assert viz_features(run, tmp_path / "b.png", "--images", "1") == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def write_preds(root, size=(6, 8)):
    h, w = size
    labels = torch.arange(h * w).reshape(h, w) % 21
    write_predictions(root, "semseg", ["a", "b"], [labels, labels.flip(0)])
    write_predictions(root, "saliency", ["a"], [torch.rand(1, h, w)])
    write_predictions(root, "depth", ["a", "b"], [torch.rand(1, h, w) + 1, torch.rand(1, h, w) + 2])


def test_viz_preds_draws_each_prediction_and_a_panel_per_sample(tmp_path, capsys):
    preds, images, out = tmp_path / "preds", tmp_path / "images", tmp_path / "out"
    write_preds(preds)
    images.mkdir()
    for name in ("a.jpg", "b.PNG"):
        Image.fromarray(np.full((6, 8, 3), 200, np.uint8)).save(images / name)
    assert main(["viz", "preds", str(preds), "--out", str(out), "--image-folder", str(images)]) == 0
    said = capsys.readouterr().out
    assert "wrote 2 panel(s)" in said and "(image | semseg | saliency | depth)" in said
    from sak.engine.predictions import read_prediction

    for task in ("semseg", "depth"):
        for i in "ab":
            drawn = np.array(Image.open(out / task / f"{i}.png"))
            assert (drawn == create_task(task).visualize(read_prediction(preds, task, i))).all()
    panel = np.array(Image.open(out / "panels" / "b.png"))
    assert panel.shape == (6, 4 * 8 + 3 * GAP, 3)
    assert (panel[:, :8] == 200).all()  # the image first (a JPEG of a flat grey: exact)
    assert (panel[:, 8 : 8 + GAP] == 255).all()  # the gap
    assert (panel[:, 2 * (8 + GAP) : 3 * 8 + 2 * GAP] == 128).all()  # b has no saliency: its column grey
    assert (panel[:, 8 + GAP:2 * 8 + GAP] == np.array(Image.open(out / "semseg" / "b.png"))).all()  # fmt: skip
    columns, panels = colour_predictions(preds, tmp_path / "two", None, ["depth"])
    assert columns == ["depth"] and [p.name for p in panels] == ["a.png", "b.png"]


def test_viz_preds_errors_name_the_file_folder_or_flag(tmp_path, capsys):
    preds = tmp_path / "preds"
    write_preds(preds)
    before = (preds / "semseg" / "a.png").read_bytes()
    write_predictions(preds, "edges", ["a"], [torch.rand(1, 5, 8)])  # another size than a's other predictions
    assert main(["viz", "preds", str(preds), "--out", str(tmp_path / "o")]) == 2
    assert (
        "a: the image and its predictions differ in size (semseg 6x8, saliency 6x8, edges 5x8"
        in capsys.readouterr().err
    )
    (tmp_path / "images").mkdir()
    assert main(["viz", "preds", str(preds), "--out", str(tmp_path / "o"), "--image-folder",
                 str(tmp_path / "images")]) == 2  # fmt: skip
    assert f"{tmp_path / 'images'}: no image a.* (.jpg" in capsys.readouterr().err
    assert main(["viz", "preds", str(tmp_path / "images"), "--out", str(tmp_path / "o")]) == 2
    assert "no folder of predictions of any task" in capsys.readouterr().err
    assert main(["viz", "preds", str(preds), "--out", str(tmp_path / "o"), "--tasks", "semseg,sal"]) == 2
    assert "--tasks: no prediction format for ['sal']" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["viz", "preds", str(preds), "--out", str(tmp_path / "file")]) == 2
    assert "a file; sak viz preds writes a folder of pictures there" in capsys.readouterr().err
    assert main(["viz", "preds", str(preds), "optim.lr=1", "--images", "2", "--out", str(tmp_path / "o")]) == 2
    assert "sak viz preds does not take --images optim.lr=1: they are for sak viz features" in capsys.readouterr().err
    assert main(["viz", "features", str(TINY), "--checkpoint", "x", "--tasks", "semseg", "--out", "f.png"]) == 2
    assert "sak viz features does not take --tasks: it is for sak viz preds" in capsys.readouterr().err
    # --out the predictions' own folder: each label map would be replaced by its picture
    assert main(["viz", "preds", str(preds), "--out", str(preds)]) == 2
    assert "the folder of the predictions, whose files the pictures would replace" in capsys.readouterr().err
    assert (preds / "semseg" / "a.png").read_bytes() == before
    # inside a task's folder: that folder is read recursively, so the pictures were read as its predictions later
    assert main(["viz", "preds", str(preds), "--out", str(preds / "semseg" / "pictures")]) == 2
    assert "inside " + str(preds / "semseg") + ", whose files are read as semseg predictions" in capsys.readouterr().err
    (tmp_path / "empty" / "semseg").mkdir(parents=True)
    assert main(["viz", "preds", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no prediction files in semseg/" in capsys.readouterr().err


def test_viz_preds_finds_ids_holding_a_folder_as_a_folder_dataset_names_them(tmp_path):
    """An image folder's ids are relative paths (n01/img_1): their files sit in subfolders, which a one-level
    listing missed ("wrote 0 panel(s)")."""
    preds = tmp_path / "preds"
    write_predictions(preds, "semseg", ["n01/img_1", "n02/img_2"], [torch.zeros(4, 4, dtype=torch.long)] * 2)
    images = tmp_path / "images"
    (images / "n01").mkdir(parents=True)
    (images / "n02").mkdir()
    for i in ("n01/img_1", "n02/img_2"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(images / f"{i}.png")
    columns, panels = colour_predictions(preds, tmp_path / "out", images)
    assert columns == ["image", "semseg"]
    assert [p.relative_to(tmp_path / "out").as_posix() for p in panels] == [
        "panels/n01/img_1.png",
        "panels/n02/img_2.png",
    ]
    assert (tmp_path / "out" / "semseg" / "n02" / "img_2.png").is_file()


def test_viz_preds_draws_an_id_that_starts_with_a_dot_and_leaves_out_unfinished_writes(tmp_path):
    """`sak predict` names `.hidden.jpg`'s predictions `.hidden.png`; only its temporary `.NAME.PID.partial.png`
    files, a write it had not renamed, are to be left out."""
    preds = tmp_path / "preds"
    write_predictions(preds, "semseg", [".hidden", "a"], [torch.zeros(4, 4, dtype=torch.long)] * 2)
    (preds / "semseg" / ".a.png.123.partial.png").write_bytes((preds / "semseg" / "a.png").read_bytes())
    _, panels = colour_predictions(preds, tmp_path / "out", None)
    assert [p.name for p in panels] == [".hidden.png", "a.png"]
