"""Export drops distillation-only parts, rebuilds without teachers, and predicts in the standard formats."""

import os
import types

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from sak.cli import main
from sak.engine import train
from sak.engine.build import build_student, build_tasks, build_teachers
from sak.engine.export import load_exported, predict_images
from sak.engine.init import student_weights_file
from sak.engine.predictions import PredictionError

from ..conftest import TESTS


def test_export_then_predict(tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe("schedule.max_steps=2", "student.aligner=always", path=TESTS / "tiny_multitask.yaml")
    train(recipe)
    out = tmp_path / "export"
    assert main(["export", str(TESTS / "tiny_multitask.yaml"), f"run.output_dir={tmp_path}", "--out", str(out)]) == 0
    exported = load_file(str(out / "student.safetensors"))
    assert exported and not any(k.startswith("aligners.") for k in exported)

    model, config = load_exported(out)
    trained = build_student(recipe, build_teachers(recipe, torch.device("cpu")), build_tasks(recipe))
    trained.load_state_dict(load_file(str(student_weights_file(recipe.run_dir))))
    trained.eval()
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        a, b = model(images, with_features=False).tasks, trained(images, with_features=False).tasks
    for task in a:
        torch.testing.assert_close(a[task], b[task])

    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(photo)
    preds = tmp_path / "preds"
    assert main(["predict", str(out), str(photo), "--out", str(preds)]) == 0
    semseg = np.asarray(Image.open(preds / "semseg" / "photo.png"))
    assert semseg.shape == (50, 70) and semseg.max() < 5
    normals = np.asarray(Image.open(preds / "normals" / "photo.png"))
    assert normals.shape == (50, 70, 3)
    n = normals / 127.5 - 1
    assert np.allclose(np.linalg.norm(n, axis=-1), 1, atol=0.03)
    assert np.load(preds / "depth" / "photo.npy").shape == (50, 70)
    for task in ("saliency", "edges", "parts"):
        assert (preds / task / "photo.png").is_file()
    assert len(predict_images(model, config, [str(photo)], tmp_path / "from_python")) == 6  # str paths too
    twice = [photo, tmp_path / "." / "photo.png"]  # one file given twice: predicted once, 6 files, not "12"
    assert len(predict_images(model, config, twice, tmp_path / "twice")) == 6
    # an export written before student.yaml recorded the canvas predicts in the square training size
    config = yaml.safe_load((out / "student.yaml").read_text())
    assert config.pop("canvas") == [64, 64] and config.pop("image_fill") == [124, 116, 104]
    (out / "student.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["predict", str(out), str(photo), "--out", str(tmp_path / "old")]) == 0
    for task in ("semseg", "normals", "saliency", "edges", "parts"):
        assert (tmp_path / "old" / task / "photo.png").read_bytes() == (preds / task / "photo.png").read_bytes()
    # such an export, exported again from its own folder, gets today's student.yaml and the same weights
    again = tmp_path / "again"
    recipe_args = [str(TESTS / "tiny_multitask.yaml"), f"run.output_dir={tmp_path}"]
    assert main(["export", *recipe_args, "--from", str(out), "--out", str(again)]) == 0
    assert yaml.safe_load((again / "student.yaml").read_text())["canvas"] == [64, 64]
    assert load_file(str(again / "student.safetensors")).keys() == exported.keys()
    for key, value in load_file(str(again / "student.safetensors")).items():
        assert torch.equal(value, exported[key]), key
    # two inputs with one file name would overwrite each other's outputs: refused before anything is written
    (tmp_path / "b").mkdir()
    twin = tmp_path / "b" / "photo.png"
    twin.write_bytes(photo.read_bytes())
    other = tmp_path / "others"
    (tmp_path / "b" / "photo2.png").write_bytes(photo.read_bytes())
    assert main(["predict", str(out), str(photo), str(twin), "--out", str(other)]) == 2
    assert not other.exists()
    # a missing file among the inputs: nothing written (the photographs before it were predicted, then it failed)
    assert main(["predict", str(out), str(photo), str(tmp_path / "gone.png"), "--out", str(other)]) == 2
    assert not other.exists()
    # an unreadable one: the error says which, and what was written before it
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert main(["predict", str(out), str(photo), str(tmp_path / "broken.png"), "--out", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'broken.png'}" in err and f"the 1 image(s) before it were predicted into {other}/" in err
    assert (other / "semseg" / "photo.png").is_file()
    # a NaN output (here depth's, on the second image): named with its image, none of that image's files written
    model, config = load_exported(out)
    calls = []
    model.heads["depth"].register_forward_hook(
        lambda m, i, o: o * float("nan") if calls.append(1) or len(calls) > 1 else o
    )
    with pytest.raises(PredictionError, match=rf"{tmp_path / 'b' / 'photo2.png'}: depth: the prediction holds NaN.*"
                       rf"none of its files was written; the 1 image\(s\) before it were predicted into"):  # fmt: skip
        predict_images(model, config, [photo, (tmp_path / "b" / "photo2.png")], tmp_path / "nan")
    assert sorted(p.name for p in (tmp_path / "nan").rglob("*.*")) == ["photo.npy"] + ["photo.png"] * 5


def test_a_plugin_dataset_not_derived_from_sak_dataset_exports_with_the_square_training_size(tiny_recipe):
    """export_config asked every registered dataset for its prediction canvas; a plain torch Dataset has none."""
    from dataclasses import dataclass

    from sak.engine.export import export_config
    from sak.registry import DATASETS

    @DATASETS.register("test_plain_dataset")
    class Plain(torch.utils.data.Dataset):
        @dataclass
        class Options:
            length: int = 4

    try:
        config = export_config(tiny_recipe("data.name=test_plain_dataset", "data.options={}"))
    finally:
        DATASETS._entries.pop("test_plain_dataset")
    assert config["canvas"] == [64, 64] and config["image_fill"] == [124, 116, 104]


def test_predicting_with_a_stage_1_student_is_refused_before_anything_is_written(tiny_recipe, tmp_path, capsys):
    train(tiny_recipe("schedule.max_steps=1"))
    out = tmp_path / "export"
    assert main(["export", str(TESTS / "tiny.yaml"), f"run.output_dir={tmp_path}", "--out", str(out)]) == 0
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(photo)
    capsys.readouterr()
    assert main(["predict", str(out), str(photo), "--out", str(tmp_path / "preds")]) == 2
    assert "has no task heads" in capsys.readouterr().err and not (tmp_path / "preds").exists()


def test_exporting_with_another_recipe_is_refused_and_keeps_the_earlier_export(tiny_recipe, tmp_path, capsys):
    """A multitask run exported with the stage-1 recipe (no heads), or with another width, used to write a
    student.yaml that its weights did not fit (`sak predict` then printed load_state_dict's traceback)."""
    recipe = tiny_recipe("schedule.max_steps=1", path=TESTS / "tiny_multitask.yaml")
    train(recipe)
    run = f"run.output_dir={tmp_path}"
    out = tmp_path / "export"
    assert main(["export", str(TESTS / "tiny_multitask.yaml"), run, "--out", str(out)]) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    capsys.readouterr()
    wrong = [
        ["export", str(TESTS / "tiny.yaml"), "--from", str(recipe.run_dir), "--out", str(out)],  # no heads
        ["export", str(TESTS / "tiny_multitask.yaml"), run, "student.model_kwargs.embed_dim=64", "--out", str(out)],
    ]
    for argv in wrong:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "ExportError" in err and "do not make the recipe's student" in err and "recipe.yaml" in err, err
        assert len(err.strip().splitlines()) == 1
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # nothing half-written beside it either
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".export")) == []


def test_predict_names_what_is_wrong_with_the_export_directory(tiny_recipe, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(photo)
    assert main(["predict", str(tmp_path / "nope"), str(photo), "--out", str(tmp_path / "p")]) == 2
    assert "is not an export directory: `sak export` writes student.yaml" in capsys.readouterr().err
    train(tiny_recipe("schedule.max_steps=1", path=TESTS / "tiny_multitask.yaml"))
    out = tmp_path / "export"
    assert main(["export", str(TESTS / "tiny_multitask.yaml"), f"run.output_dir={tmp_path}", "--out", str(out)]) == 0
    config = (out / "student.yaml").read_text()
    (out / "student.yaml").write_text(config.replace("down_ratio: 4", "down_ratio: 2"))  # edited by hand
    capsys.readouterr()
    assert main(["predict", str(out), str(photo), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "student.safetensors does not make the student of student.yaml (size mismatch for" in err, err
    edited = {k: v for k, v in yaml.safe_load(config).items() if k not in ("tasks", "image_size")}
    (out / "student.yaml").write_text(yaml.safe_dump(edited))  # keys left out by hand: a bare "KeyError: 'tasks'"
    assert main(["predict", str(out), str(photo), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "student.yaml' is not an export's student.yaml (it has no 'tasks', 'image_size'); export again" in err


def test_an_export_interrupted_between_its_two_files_or_damaged_is_named(tiny_recipe, tmp_path, capsys):
    """student.yaml records its weights' sha256: new weights beside an earlier student.yaml (a crash between
    the two renames, or a file swapped by hand) are refused with a message that says so, as is a damaged
    weights file, in `sak predict` and in `sak export --from` alike."""
    recipe = tiny_recipe("schedule.max_steps=1", path=TESTS / "tiny_multitask.yaml")
    train(recipe)
    out = tmp_path / "export"
    assert main(["export", str(TESTS / "tiny_multitask.yaml"), f"run.output_dir={tmp_path}", "--out", str(out)]) == 0
    load_exported(out)  # whole: loads
    first = (out / "student.safetensors").read_bytes()
    train(tiny_recipe("schedule.max_steps=2", path=TESTS / "tiny_multitask.yaml"))  # trains on: other weights
    assert main(["export", str(TESTS / "tiny_multitask.yaml"), f"run.output_dir={tmp_path}", "--out", str(out)]) == 0
    (out / "student.safetensors").write_bytes(first)  # the earlier weights beside the later student.yaml
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(photo)
    capsys.readouterr()
    assert main(["predict", str(out), str(photo), "--out", str(tmp_path / "p")]) == 2
    assert "is not the weights student.yaml was exported with (their sha256 differs" in capsys.readouterr().err
    # exported again from it (the directory or its weights file): refused alike, not a fresh export of them
    for source in (out, out / "student.safetensors"):
        assert main(["export", str(TESTS / "tiny_multitask.yaml"), "--from", str(source),
                     "--out", str(tmp_path / "again")]) == 2  # fmt: skip
        assert "is not the weights student.yaml was exported with" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
    (out / "student.safetensors").write_bytes(first[: len(first) // 2])
    assert main(["export", str(TESTS / "tiny_multitask.yaml"), "--from", str(out / "student.safetensors"),
                 "--out", str(tmp_path / "again")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "ExportError: " in err and "is not the weights student.yaml was exported with" in err, err


def test_damaged_weights_of_an_export_without_a_digest_are_named(tiny_recipe, tmp_path):
    """Exports written before student.yaml held the weights' sha256: a damaged file is still named, not a
    safetensors traceback."""
    import yaml

    from sak.engine.export import ExportError

    train(tiny_recipe("schedule.max_steps=1", path=TESTS / "tiny_multitask.yaml"))
    out = tmp_path / "export"
    assert main(["export", str(TESTS / "tiny_multitask.yaml"), f"run.output_dir={tmp_path}", "--out", str(out)]) == 0
    config = yaml.safe_load((out / "student.yaml").read_text())
    del config["weights_sha256"]
    (out / "student.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    load_exported(out)  # without a digest, as before
    weights = out / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ExportError, match="student.safetensors' is damaged or not a safetensors file"):
        load_exported(out)


def test_the_exported_student_normalises_its_input_as_the_trained_one(tiny_recipe, tmp_path):
    """student.normalization travels in student.yaml; a hub tag's mean / std too (the export's stem is built
    without weights: under the bare model name it took the default tag's, 0.5 for ViTs whose DINO tag has
    ImageNet's)."""
    from sak.engine.export import export_config, export_student
    from sak.student import TeacherAgnosticStem
    from sak.teachers.base import IMAGENET_MEAN, IMAGENET_STD

    recipe = tiny_recipe("schedule.max_steps=1", "student.normalization=imagenet")
    train(recipe)
    export_student(recipe, recipe.run_dir, tmp_path / "export")
    model, config = load_exported(tmp_path / "export")
    assert config["student"]["normalization"] == "imagenet"
    assert (model.stem.mean, model.stem.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert TeacherAgnosticStem("vit_small_patch16_224", 64, depth=1).mean == (0.5, 0.5, 0.5)

    student = export_config(tiny_recipe("student.pretrained=dino"))["student"]
    assert student["model"] == "vit_small_patch16_224.dino" and student["pretrained"] is None
    stem = TeacherAgnosticStem(student["model"], 64, None, student["normalization"], **student["model_kwargs"])
    assert stem.mean == IMAGENET_MEAN  # what timm gives the tag's weights


def test_an_export_without_a_checkpoint_names_the_run_directory_not_a_flag_not_given(tiny_recipe, tmp_path, capsys):
    assert main(["export", str(TESTS / "tiny.yaml"), f"run.output_dir={tmp_path}", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"sak export: no run at '{tmp_path / 'tiny'}'" in err and "sak export --from:" not in err
    (tmp_path / "tiny").mkdir()  # a run directory without checkpoints
    assert main(["export", str(TESTS / "tiny.yaml"), f"run.output_dir={tmp_path}", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "sak export (the run directory): " in err and "sak export --from:" not in err


def test_a_prediction_file_is_renamed_into_place_when_whole(tmp_path, monkeypatch):
    """A write cut short (a full disk) left a truncated depth .npy under its final name."""
    from sak.engine.predictions import save_encoded

    def cut(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("sak.files.os.replace", cut)  # (save_encoded writes through files.write_whole)
    with pytest.raises(OSError, match="No space left"):
        save_encoded(tmp_path, "depth", "x", np.ones((4, 4), np.float32))
    assert list((tmp_path / "depth").iterdir()) == []
    monkeypatch.undo()
    for task, array in (("depth", np.ones((4, 4), np.float32)), ("semseg", np.ones((4, 4), np.uint8))):
        path = save_encoded(tmp_path, task, "x", array)
        assert path.name in ("x.npy", "x.png") and [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize(
    ("size", "scale"),
    [((480, 640), 0.9), ((500, 700), 576 / 700)],  # 432 / 480 = 0.9; 411 / 500 = 0.822, not 576 / 700 = 0.8229
)
def test_depth_of_a_photograph_shrunk_to_fit_the_canvas_is_given_at_its_own_distance(size, scale, tmp_path):
    """Training divides depth by the resize factor (a shrunk image looks farther away): a full 480 x 640 NYUD
    frame, shrunk to 432 x 576 for the 448 x 576 canvas, was predicted 11% too far. Other tasks keep their
    values; each prediction is resized back to the photograph's size."""
    from types import SimpleNamespace

    class Constant(torch.nn.Module):  # what a student taught by the training's rule answers for a 3 m scene
        def forward(self, images, with_features=False):
            h, w = images.shape[-2:]
            return SimpleNamespace(tasks={"depth": torch.full((1, 1, h, w), 3.0 / scale),
                                          "saliency": torch.full((1, 2, h, w), 0.5)})  # fmt: skip

    photo = tmp_path / "frame.png"
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(photo)
    config = {"tasks": [{"name": "depth", "channels": 1}, {"name": "saliency", "channels": 2}],
              "canvas": [448, 576], "image_fill": [0, 0, 0], "image_size": 448}  # fmt: skip
    predict_images(Constant(), config, [photo], tmp_path / "preds")
    depth = np.load(tmp_path / "preds" / "depth" / "frame.npy")
    # unscaled by the factor training divides by, not by the ratio of the rounded sides (0.1% off for 500 x 700)
    assert depth.shape == size and np.allclose(depth, 3.0, atol=1e-5)
    assert np.asarray(Image.open(tmp_path / "preds" / "saliency" / "frame.png")).shape == size


def test_predict_refuses_before_any_image_what_it_cannot_write(tmp_path, capsys, monkeypatch):
    """A plug-in task's head ran on the first image before its missing file format stopped everything; a folder
    given for images was "not found"; two names differing in case only overwrote each other on macOS."""
    from sak.registry import TASKS
    from sak.tasks.base import Task

    monkeypatch.setitem(TASKS._entries, "test_plugin_task", type("PluginTask", (Task,), {"name": "test_plugin_task"}))

    class Never(torch.nn.Module):
        def forward(self, images, with_features=False):
            raise AssertionError("the student ran")

    photo = tmp_path / "Photo.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "photo.jpg")
    config = {
        "tasks": [{"name": "semseg", "channels": 3}],
        "canvas": [16, 16],
        "image_fill": [0, 0, 0],
        "image_size": 16,
    }
    plugin = {**config, "tasks": [{"name": "test_plugin_task", "channels": 1}]}
    with pytest.raises(ValueError, match=r"predicts \['test_plugin_task'\], which have no prediction file format"):
        predict_images(Never(), plugin, [photo], tmp_path / "p")
    # beside a built-in task (the whole student was refused): the built-in task's files are written, with a warning
    both = {**config, "tasks": [*config["tasks"], {"name": "test_plugin_task", "channels": 1}]}

    class Zeros(torch.nn.Module):
        def forward(self, images, with_features=False):
            b, _, h, w = images.shape
            return types.SimpleNamespace(
                tasks={"semseg": torch.zeros(b, 3, h, w), "test_plugin_task": torch.zeros(b, 1, h, w)}
            )

    with pytest.warns(UserWarning, match=r"\['test_plugin_task'\] have no prediction file format .*: not written"):
        written = predict_images(Zeros(), both, [photo], tmp_path / "both")
    assert written == [tmp_path / "both" / "semseg" / "Photo.png"] and sorted(os.listdir(tmp_path / "both")) == [
        "semseg"
    ]
    with pytest.raises(ValueError, match=rf"{tmp_path / 'imgs'}: a folder, not an image file; give the images"):
        predict_images(Never(), config, [photo, tmp_path / "imgs"], tmp_path / "p")
    with pytest.raises(ValueError, match=r"Photo.png and .*photo.jpg would both write <task>/Photo.png \(.npy for "
                       r"depth\) per task on a disk that ignores case"):  # fmt: skip
        predict_images(Never(), config, [photo, tmp_path / "imgs" / "photo.jpg"], tmp_path / "p")
    assert not (tmp_path / "p").exists()
    # image files after --out are images too (they were "unrecognized arguments")
    assert main(["predict", str(tmp_path / "no-export"), str(photo), "--out", str(tmp_path / "p"), str(photo)]) == 2
    err = capsys.readouterr().err
    assert "is not an export directory" in err and "unrecognized" not in err


def test_predict_refuses_an_out_that_would_replace_its_inputs_or_their_datasets_files(tmp_path, capsys):
    """`sak predict E ovr/semseg/a.png --out ovr` replaced its input with a class map, and `--out NYUD2` with
    NYUD2/images/0005.png replaced NYUD-v2's depth/0005.npy; a file where a task's folder goes failed halfway."""
    from sak.engine.export import predict_images

    class Never(torch.nn.Module):
        def forward(self, images, with_features=False):
            raise AssertionError("the student ran")

    config = {"tasks": [{"name": "semseg", "channels": 3}, {"name": "depth", "channels": 1}], "canvas": [16, 16],
              "image_fill": [0, 0, 0], "image_size": 16}  # fmt: skip
    (tmp_path / "ovr" / "semseg").mkdir(parents=True)
    image = tmp_path / "ovr" / "semseg" / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    with pytest.raises(ValueError, match=rf"--out {tmp_path / 'ovr'} holds the input .*a.png, and .*semseg/a.png is "
                       "there already: it may be a dataset's own file or the image itself"):  # fmt: skip
        predict_images(Never(), config, [image], tmp_path / "ovr")
    nyud = tmp_path / "NYUD2"
    (nyud / "images").mkdir(parents=True)
    (nyud / "depth").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(nyud / "images" / "0005.png")
    np.save(nyud / "depth" / "0005.npy", np.ones((8, 8), np.float32))
    with pytest.raises(ValueError, match=r"holds the input .*0005.png, and .*depth/0005.npy is there already"):
        predict_images(Never(), config, [nyud / "images" / "0005.png"], nyud)
    assert np.load(nyud / "depth" / "0005.npy").tolist() == np.ones((8, 8)).tolist()
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "depth").write_text("x")
    assert main(["predict", str(tmp_path / "no-export"), str(image), "--out", str(tmp_path / "q")]) == 2
    assert "holds a file 'depth' where the depth predictions' folder goes" in capsys.readouterr().err


def test_export_of_a_run_trained_with_another_output_dir_says_to_give_its_overrides(tiny_recipe, tmp_path, capsys):
    """`sak export RECIPE` finds the run at the recipe's run.output_dir / run.name: one trained with those
    overridden was reported as "'.../tiny' is neither a .safetensors file, ..." naming no cause."""
    train(
        tiny_recipe(
            "schedule.max_steps=1", f"run.output_dir={tmp_path / 'elsewhere'}", path=TESTS / "tiny_multitask.yaml"
        )
    )
    argv = [
        "export",
        str(TESTS / "tiny_multitask.yaml"),
        f"run.output_dir={tmp_path / 'runs'}",
        "--out",
        str(tmp_path / "e"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        f"no run at '{tmp_path / 'runs' / 'tiny_mt'}' (the recipe's run.output_dir / run.name); give the overrides"
        in err
    )
    assert main(["export", str(tmp_path / "elsewhere" / "tiny_mt" / "recipe.yaml"), "--out", str(tmp_path / "e")]) == 0
    assert (
        main(["export", str(TESTS / "tiny.yaml"), "--from", str(tmp_path / "nothing"), "--out", str(tmp_path / "f")])
        == 2
    )
    assert "model.safetensors, an export directory (student.yaml), nor a run directory" in capsys.readouterr().err
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(photo)
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "e"), str(photo), "--out", f"{tmp_path / 'p'}/"]) == 0
    assert f"under {tmp_path / 'p'}/\n" in capsys.readouterr().out  # (it said "p//")


def test_predict_runs_where_device_says_under_the_recipes_autocast(tmp_path, capsys, monkeypatch):
    """`sak predict` ran on the CPU only, whatever the machine had: `--device` (default auto: a CUDA GPU when
    there is one) says where, and fp16 autocasts there as `sak eval` does, on CUDA only."""
    from sak.engine.export import resolve_device

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, images, with_features=False):
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            seen.append((images.device.type, self.w.device.type, dtype))
            logits = torch.zeros(1, 3, *images.shape[-2:]) + self.w
            return type("Out", (), {"tasks": {"semseg": logits}})()

    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
    config = {"tasks": [{"name": "semseg", "channels": 3}], "canvas": [16, 16], "image_fill": [0, 0, 0]}
    for mixed, dtype in (("bf16", torch.bfloat16), ("fp16", None), ("no", None)):
        predict_images(Probe(), {**config, "mixed": mixed, "image_size": 16}, [photo], tmp_path / mixed, "cpu")
        assert seen.pop() == ("cpu", "cpu", dtype)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    for name, message in (("cuda", r"this machine has 0 CUDA GPU\(s\); use cpu"), ("cuda:1", "has 0 CUDA"),
                          ("gpu0", "expected cpu, cuda, cuda:N or auto"), ("meta", "expected cpu, cuda")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            resolve_device(name)
    # refused before the export is read
    assert (
        main(["predict", str(tmp_path / "no-export"), str(photo), "--out", str(tmp_path / "p"), "--device", "cuda"])
        == 2
    )
    assert "sak predict: ValueError: --device 'cuda': this machine has 0 CUDA GPU(s)" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_predict_on_a_gpu_writes_what_the_cpu_writes(tiny_recipe, tmp_path):
    recipe = tiny_recipe("schedule.max_steps=1", path=TESTS / "tiny_multitask.yaml")
    train(recipe)
    out = tmp_path / "export"
    assert main(["export", str(TESTS / "tiny_multitask.yaml"), f"run.output_dir={tmp_path}", "--out", str(out)]) == 0
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(photo)
    for device in ("cpu", "cuda"):
        assert main(["predict", str(out), str(photo), "--out", str(tmp_path / device), "--device", device]) == 0
    depth = [np.load(tmp_path / d / "depth" / "photo.npy") for d in ("cpu", "cuda")]
    assert np.allclose(*depth, rtol=1e-3, atol=1e-4)
    semseg = [np.asarray(Image.open(tmp_path / d / "semseg" / "photo.png")) for d in ("cpu", "cuda")]
    assert (semseg[0] == semseg[1]).mean() > 0.99


def test_an_export_into_a_run_or_checkpoint_directory_is_refused(tiny_recipe, tmp_path, capsys):
    """An export written into the run directory shadowed its later checkpoints for `sak eval` (which read the
    export), and one written into a checkpoint folder was deleted with it by pruning."""
    recipe = tiny_recipe("schedule.max_steps=1", path=TESTS / "tiny_multitask.yaml")
    train(recipe)
    argv = ["export", str(TESTS / "tiny_multitask.yaml"), f"run.output_dir={tmp_path}", "--out"]
    checkpoint = recipe.run_dir / "checkpoints" / "step_00000001"
    for out, said in ((recipe.run_dir, "a run directory"), (checkpoint, "inside the checkpoints"),
                      (checkpoint / "export", "inside the checkpoints")):  # fmt: skip
        assert main([*argv, str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: {said}" in err and "export beside it" in err, err
    assert not (recipe.run_dir / "student.yaml").exists() and not (checkpoint / "export").exists()
    # a folder in the run beside its checkpoints shadows nothing; a folder named checkpoints without any is no run
    assert main([*argv, str(recipe.run_dir / "export")]) == 0
    (tmp_path / "checkpoints").mkdir()
    assert main([*argv, str(tmp_path / "exported")]) == 0


def test_an_out_that_is_a_file_is_named_for_export_and_cache_build(tiny_recipe, tmp_path):
    """A raw FileExistsError before (cache build: after building the teachers and printing its plan)."""
    from sak.engine.cache import CacheError, build_cache
    from sak.engine.export import ExportError, export_student

    (tmp_path / "taken.json").write_text("{}")
    with pytest.raises(ExportError, match=r"--out .*taken.json: a file; an export is a folder"):
        export_student(tiny_recipe(), tmp_path / "no-run", tmp_path / "taken.json")
    with pytest.raises(CacheError, match=r"--out .*taken.json: a file; a cache is a folder"):
        build_cache(tiny_recipe(), tmp_path / "taken.json")
    assert (tmp_path / "taken.json").read_text() == "{}"
