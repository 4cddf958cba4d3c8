"""Task evaluation: the prediction file formats, `sak eval` on a tiny student trained on the PASCAL fixture,
file scoring that reproduces the in-memory numbers, clear errors, and 2 processes == 1 process."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import torch
import yaml
from PIL import Image

from sak.cli import main
from sak.data.fixtures import write_pascal_context
from sak.data.pascal_context import edges_from_label_map
from sak.engine import train
from sak.engine.checkpoint import latest_checkpoint
from sak.engine.predictions import (
    read_prediction,
)
from sak.metrics import build_metric
from sak.metrics.boundary import seg2bmap

from ..conftest import REPO

TASKS = ("semseg", "parts", "saliency", "normals", "edges")
RECIPE = """
run: {{name: tiny_pascal, output_dir: {out}, seed: 0, stage: multitask}}
teachers:
  - name: timm
    key: vit_a
    options: {{model: vit_small_patch14_dinov2, model_kwargs: {{embed_dim: 48, depth: 2, num_heads: 2, img_size: 56}}}}
student:
  model: vit_small_patch16_224
  model_kwargs: {{embed_dim: 32, depth: 2, num_heads: 2, dynamic_img_size: true}}
tasks: [{{name: semseg}}, {{name: parts}}, {{name: saliency}}, {{name: normals}}, {{name: edges}}]
data: {{name: pascal_context, root: {root}, image_size: 64, batch_size: 4, options: {{eval_size: [48, 64]}}}}
eval: {{batch_size: 2}}
optim: {{lr: 2.0e-3}}
schedule: {{name: constant, max_steps: 2}}
logging: {{every: 1, progress: false, wandb: {{mode: disabled}}}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# a tiny student trained on the PASCAL fixture
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(recipe file, run directory, data root): 2 steps on the fixture (5 val images, uneven shards)."""
    from accelerate.state import AcceleratorState, GradientState

    from sak.config import load_recipe

    work = tmp_path_factory.mktemp("task_eval")
    root = write_pascal_context(work / "PASCAL_MT", n_train=4, n_val=5, size=(48, 64))
    recipe_file = work / "recipe.yaml"
    recipe_file.write_text(RECIPE.format(out=work / "runs", root=root))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    recipe = load_recipe(recipe_file)
    train(recipe)
    return recipe_file, recipe.run_dir, root


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    """`sak eval --save-preds --out` once: (result JSON, predictions folder)."""
    from accelerate.state import AcceleratorState, GradientState

    recipe_file, run_dir, _ = trained
    work = tmp_path_factory.mktemp("evaluated")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    args = ["eval", str(recipe_file), "--checkpoint", str(run_dir), "--out", str(work / "eval.json")]
    assert main([*args, "--save-preds", str(work / "preds")]) == 0
    return json.loads((work / "eval.json").read_text()), work / "preds"


def test_eval_scores_every_task_of_the_dataset(evaluated):
    result, _ = evaluated
    assert result["dataset"] == "pascal_context" and result["split"] == "val" and result["n_images"] == 5
    assert set(result["tasks"]) == set(TASKS)
    headline = {"semseg": "mIoU", "parts": "mIoU", "saliency": "maxF", "normals": "mErr", "edges": "odsF"}
    for task, name in headline.items():
        assert np.isfinite(result["tasks"][task][name]) and result["headline"][task] == result["tasks"][task][name]
    assert result["reference"]["source"] == "published single-task" and np.isfinite(result["delta_m"])
    assert result["delta_m_tasks"] == list(TASKS)


def test_scoring_the_saved_files_reproduces_the_in_memory_numbers_exactly(evaluated, trained, tmp_path, capsys):
    result, preds = evaluated
    _, _, root = trained
    ids = (root / "ImageSets" / "Context" / "val.txt").read_text().split()
    for task in TASKS:
        assert sorted(p.stem for p in (preds / task).iterdir()) == sorted(ids)
    out = tmp_path / "files.json"
    assert main(["eval-preds", "--dataset", "pascal_context", "--root", str(root), "--preds", str(preds),
                 "--out", str(out)]) == 0  # fmt: skip
    files = json.loads(out.read_text())
    assert files["tasks"] == result["tasks"], "file scoring must equal in-memory scoring bit for bit"
    assert files["delta_m"] == result["delta_m"] and files["n_images"] == 5
    reference = tmp_path / "nyud_reference.json"
    reference.write_text('{"depth": 0.5}')  # no task of PASCAL's: refused before scoring (delta_m was null)
    capsys.readouterr()
    assert main(["eval-preds", "--dataset", "pascal_context", "--root", str(root), "--preds", str(preds),
                 "--reference", str(reference)]) == 2  # fmt: skip
    assert "--reference has none of the tasks scored here" in capsys.readouterr().err


def test_pascal_boundaries_are_scored_against_seism_seg2bmap_of_the_label_map(evaluated, trained):
    result, preds = evaluated
    _, _, root = trained
    seism, training = build_metric("edges", "pascal_context"), build_metric("edges", "pascal_context")
    for sample_id in (root / "ImageSets" / "Context" / "val.txt").read_text().split():
        labels = scipy.io.loadmat(root / "pascal-context" / "trainval" / f"{sample_id}.mat")["LabelMap"]
        pred = read_prediction(preds, "edges", sample_id, labels.shape)[None]
        seism.update(pred, torch.from_numpy(seg2bmap(labels).astype(np.float32))[None, None])
        training.update(pred, torch.from_numpy(edges_from_label_map(labels))[None, None])
    assert result["tasks"]["edges"] == seism.compute()
    assert result["tasks"]["edges"] != training.compute()


@pytest.mark.parametrize("problem", ["missing", "wrong size"])
def test_eval_preds_names_a_missing_or_wrong_size_file(problem, evaluated, trained, tmp_path, capsys):
    _, preds = evaluated
    _, _, root = trained
    copy = shutil.copytree(preds, tmp_path / "preds")
    victim = sorted((copy / "saliency").iterdir())[1]
    if problem == "missing":
        victim.unlink()
    else:
        Image.fromarray(np.zeros((3, 3), np.uint8)).save(victim)
    args = ["eval-preds", "--dataset", "pascal_context", "--root", str(root), "--preds", str(copy)]
    assert main([*args, "--tasks", "semseg,saliency"]) == 2
    err = capsys.readouterr().err
    assert f"sak: error: {victim}: " in err
    assert ("not found" if problem == "missing" else "prediction is 3x3, the ground truth is") in err
    if problem == "missing":  # --preds given a file, as one might a results file: said so, not "does not exist"
        assert main([*args[:-1], str(victim.with_name(sorted(os.listdir(victim.parent))[0]))]) == 2
        assert "is a file, not the folder of predictions" in capsys.readouterr().err


def test_eval_preds_names_the_folders_it_leaves_out_with_the_reference_codes_names(
    evaluated, trained, tmp_path, capsys
):
    """Folders named as in the MTI-Net / InvPT lineage (`sal`, `edge`, `human_parts`) went unscored in silence."""
    _, preds = evaluated
    _, _, root = trained
    copy = shutil.copytree(preds, tmp_path / "preds")
    (copy / "saliency").rename(copy / "sal")
    (copy / "edges").rename(copy / "edge")
    args = ["eval-preds", "--dataset", "pascal_context", "--root", str(root), "--preds", str(copy)]
    out = tmp_path / "r.json"
    with pytest.warns(RuntimeWarning, match=r"left out the folder\(s\) edge, sal, which name no pascal_context task"):
        assert main([*args, "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["tasks"]) == {"semseg", "parts", "normals"}
    capsys.readouterr()
    assert main([*args, "--tasks", "sal"]) == 2
    assert "rename sal -> saliency" in capsys.readouterr().err
    for task in ("semseg", "parts", "normals"):
        shutil.rmtree(copy / task)
    assert main(args) == 2
    assert (
        "it has edge, sal (the reference code's names: rename edge -> edges, sal -> saliency; from SAK's "
        "save_img, edges/ takes edge/img's maps, not edge/nms's: sak thins them itself)" in capsys.readouterr().err
    )


def test_eval_preds_names_files_that_are_no_prediction_of_the_split(evaluated, trained, tmp_path, capsys):
    """Predictions of another split (or a .jpg among the .png) were left out in silence, and the score read as
    covering them."""
    result, preds = evaluated
    _, _, root = trained
    copy = shutil.copytree(preds, tmp_path / "preds")
    first = sorted((copy / "semseg").iterdir())[0]
    shutil.copy(first, copy / "semseg" / "train_0001.png")
    shutil.copy(first, first.with_suffix(".jpg"))
    (copy / "semseg" / ".train_0002.png.partial").write_bytes(b"")  # (an unfinished write: not a file to name)
    out = tmp_path / "r.json"
    args = ["eval-preds", "--dataset", "pascal_context", "--root", str(root), "--preds", str(copy), "--out", str(out)]
    with pytest.warns(RuntimeWarning) as caught:
        assert main(args) == 0
    said = [str(w.message) for w in caught if "no pascal_context/val image's prediction" in str(w.message)]
    assert said == [f"{copy / 'semseg'}: left out 2 file(s) that are no pascal_context/val image's prediction "
                    f"(<id>.png), e.g. {first.stem}.jpg, train_0001.png"]  # fmt: skip
    assert json.loads(out.read_text())["tasks"] == result["tasks"]


def test_an_exported_student_scores_as_its_checkpoint(trained, evaluated, tmp_path):
    recipe_file, run_dir, _ = trained
    export = tmp_path / "export"
    assert main(["export", str(recipe_file), "--from", str(run_dir), "--out", str(export)]) == 0
    assert main(["eval", str(recipe_file), "--checkpoint", str(export), "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["tasks"] == evaluated[0]["tasks"]
    # the export's tasks are scored, with their targets loaded, whatever the recipe's `tasks:` lists (a bare
    # KeyError before)
    fewer = ["eval", str(recipe_file), "tasks=[{name: semseg}]", "--checkpoint", str(export)]
    assert main([*fewer, "--out", str(tmp_path / "fewer.json")]) == 0
    assert json.loads((tmp_path / "fewer.json").read_text())["tasks"] == evaluated[0]["tasks"]


def test_predicting_the_dataset_images_writes_what_eval_saves(trained, evaluated, tmp_path):
    """`sak predict` centres each photograph in the evaluation canvas at its own resolution, as `sak eval` does
    (it squashed it to the square training size before: other predictions on the fixture's 36-48 x 48-64
    images), so scoring its files reproduces `sak eval`."""
    recipe_file, run_dir, root = trained
    result, saved = evaluated
    export, preds = tmp_path / "export", tmp_path / "preds"
    assert main(["export", str(recipe_file), "--from", str(run_dir), "--out", str(export)]) == 0
    ids = (root / "ImageSets" / "Context" / "val.txt").read_text().split()
    images = [str(root / "JPEGImages" / f"{i}.jpg") for i in ids]
    assert main(["predict", str(export), *images, "--out", str(preds)]) == 0
    for task in TASKS:
        for i in ids:
            a, b = np.asarray(Image.open(preds / task / f"{i}.png")), np.asarray(Image.open(saved / task / f"{i}.png"))
            np.testing.assert_array_equal(a, b, err_msg=f"{task} {i}")  # (float32: the same bits as eval's)
    out = tmp_path / "scores.json"
    assert main(["eval-preds", "--dataset", "pascal_context", "--root", str(root), "--preds", str(preds),
                 "--out", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["tasks"] == result["tasks"]


def test_predicting_under_the_recipes_bf16_writes_what_eval_saves(trained, tmp_path):
    """`sak eval` autocasts the student to the recipe's precision.mixed (bf16 in the shipped stage-2 recipes);
    `sak predict` ran float32, and its files differed. The export records it, and predict autocasts alike."""
    recipe_file, run_dir, root = trained
    bf16, export, preds, saved = "precision.mixed=bf16", tmp_path / "export", tmp_path / "preds", tmp_path / "saved"
    args = ["eval", str(recipe_file), bf16, "--checkpoint", str(run_dir), "--save-preds", str(saved)]
    assert main([*args, "--out", str(tmp_path / "eval.json")]) == 0
    assert main(["export", str(recipe_file), bf16, "--from", str(run_dir), "--out", str(export)]) == 0
    assert yaml.safe_load((export / "student.yaml").read_text())["mixed"] == "bf16"
    ids = (root / "ImageSets" / "Context" / "val.txt").read_text().split()
    assert (
        main(["predict", str(export), *[str(root / "JPEGImages" / f"{i}.jpg") for i in ids], "--out", str(preds)]) == 0
    )
    for task in TASKS:
        for i in ids:
            a, b = np.asarray(Image.open(preds / task / f"{i}.png")), np.asarray(Image.open(saved / task / f"{i}.png"))
            np.testing.assert_array_equal(a, b, err_msg=f"{task} {i}")


def test_a_photograph_larger_than_the_canvas_is_fitted_into_it_and_predicted_at_its_own_size(trained, tmp_path):
    recipe_file, run_dir, root = trained
    export = tmp_path / "export"
    assert main(["export", str(recipe_file), "--from", str(run_dir), "--out", str(export)]) == 0
    config = yaml.safe_load((export / "student.yaml").read_text())
    assert config["canvas"] == [48, 64] and config["image_fill"] == [124, 116, 104]  # data.options.eval_size
    photo = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 200, 3), dtype=np.uint8)).save(photo)
    assert main(["predict", str(export), str(photo), "--out", str(tmp_path / "preds")]) == 0
    for task in TASKS:
        assert np.asarray(Image.open(tmp_path / "preds" / task / "wide.png")).shape[:2] == (60, 200)
    # a canvas the student's patches do not tile is refused by the export, not by every later `sak predict`
    bad = tmp_path / "bad"
    args = ["export", str(recipe_file), "data.options.eval_size=[50, 64]", "--from", str(run_dir), "--out", str(bad)]
    assert main(args) == 2 and not bad.exists()


def test_eval_preds_takes_a_canvas_for_images_larger_than_the_default(evaluated, trained, tmp_path, capsys):
    """The fixture's images are 48 x 64: a 32 x 32 canvas is too small and the error says how to give a larger
    one; any canvas that holds them scores the same (the padding is cut before scoring)."""
    result, preds = evaluated
    _, _, root = trained
    args = ["eval-preds", "--dataset", "pascal_context", "--root", str(root), "--preds", str(preds)]
    assert main([*args, "--eval-size", "32", "32"]) == 2
    assert "set data.options.eval_size to a canvas at least as large (sak eval-preds: --eval-size H W)" in (
        capsys.readouterr().err
    )
    assert main([*args, "--eval-size", "48", "80", "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["tasks"] == result["tasks"]
    assert main([*args, "--eval-size", "0", "5"]) == 2  # (it named data.options.eval_size, which is not set here)
    assert "--eval-size 0 5: the canvas's height and width are positive" in capsys.readouterr().err


def test_eval_and_eval_preds_refuse_an_out_they_could_not_write_before_scoring(
    evaluated, trained, tmp_path, capsys, monkeypatch
):
    """A folder given as --out was found at the end, after every image was scored, and the result was lost."""
    _, preds = evaluated
    recipe_file, run_dir, root = trained
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    for out, said in ((tmp_path / "folder", "a folder; give the result JSON's file name"),
                      (tmp_path / "file" / "r.json", f"{tmp_path / 'file'} is a file, so no folder can be made")):  # fmt: skip
        for command in (["eval-preds", "--dataset", "pascal_context", "--root", str(root), "--preds", str(preds)],
                        ["eval", str(recipe_file), "--checkpoint", str(run_dir)]):  # fmt: skip
            assert main([*command, "--out", str(out), "--split", "val"]) == 2
            err = capsys.readouterr().err
            assert f"--out {out}: {said}" in err and "Traceback" not in err

    def full_disk(path, text):
        raise OSError(28, f"cannot write {path}: No space left on device")

    monkeypatch.setattr("sak.files.write_text_whole", full_disk)  # found only as it is written: the scores printed
    command = ["eval-preds", "--dataset", "pascal_context", "--root", str(root), "--preds", str(preds)]
    assert main([*command, "--out", str(tmp_path / "r.json")]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["n_images"] == 5 and "No space left on device" in err


def test_two_processes_score_exactly_as_one(trained, evaluated, tmp_path):
    """And score one checkpoint of a run directory, though a training saves a newer one as they start
    (eval_race.py): each process looked up the latest on its own, and scored its images with the one it found."""
    recipe_file, run_dir, _ = trained
    run = shutil.copytree(run_dir, tmp_path / "run")
    scored = latest_checkpoint(run / "checkpoints")
    out = tmp_path / "two.json"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "tests.engine.eval_race",
        "eval", str(recipe_file), "--checkpoint", str(run), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert latest_checkpoint(run / "checkpoints").name == "step_99999999"  # (the race took place)
    two = json.loads(out.read_text())
    assert two["world_size"] == 2 and two["n_images"] == 5  # batches of 2, 2, 1 -> shards of 3 and 2 images
    assert two["tasks"] == evaluated[0]["tasks"] and two["checkpoint"] == str(scored)


def test_two_processes_warn_once_about_a_task_with_nothing_to_score(trained, tmp_path):
    """Every process computes the gathered scores, so a task with nothing scored (parts on images without
    people) printed its metric's warning and delta_m's once per process; the main process alone warns."""
    recipe_file, run_dir, root = trained
    copy = shutil.copytree(root, tmp_path / "PASCAL_MT")
    ids = (copy / "ImageSets" / "Context" / "val.txt").read_text().split()
    nobody = [ids[1], ids[4]]  # the fixture's images 1, 4, ... of a split hold no person
    (copy / "ImageSets" / "Context" / "nobody.txt").write_text("\n".join(nobody) + "\n")
    parts = json.loads((copy / "ImageSets" / "Parts" / "val.txt").read_text())
    (copy / "ImageSets" / "Parts" / "nobody.txt").write_text(json.dumps({i: parts[i] for i in nobody}))
    out = tmp_path / "nobody.json"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "sak.cli", "eval", str(recipe_file), f"data.root={copy}",
        "--split", "nobody", "--checkpoint", str(run_dir), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["n_images"] == 2 and result["headline"]["parts"] is None and "parts" not in result["delta_m_tasks"]
    assert proc.stderr.count("RuntimeWarning: delta_m leaves out ['parts']: nothing was scored") == 1, proc.stderr
    assert proc.stderr.count("no labelled pixel was scored") == 1, proc.stderr


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("nonexistent", "--checkpoint '{path}' does not exist"),
        ("empty dir", "--checkpoint '{path}' is neither an export directory (student.yaml), a checkpoint directory"),
        ("other student", "--checkpoint '{path}': the weights do not fit the recipe's student (size mismatch for "),
        ("bad reference", "{path}: cannot read the reference JSON"),
        ("reference of an unknown task", "expected {{task: number}} with tasks among"),
        ("reference of no scored task", "--reference has none of the tasks scored here (semseg, parts, saliency, "),
        ("canvas not a multiple", "data.options.eval_size [50, 64] is not a multiple of the student's patch size 16"),
        ("canvas of a fixed-size student", "the student takes 64x64 inputs but the evaluation canvas is 48x64"),
    ],
)
def test_eval_names_what_is_wrong_with_its_inputs(case, message, trained, tmp_path, capsys):
    """Every refusal of `sak eval` is one line naming the file, key or value, before anything is scored."""
    recipe_file, run_dir, _ = trained
    args, path = ["eval", str(recipe_file), "--checkpoint", str(run_dir)], run_dir
    if case == "nonexistent":
        path = tmp_path / "nothing"
        args[3] = str(path)
    elif case == "empty dir":
        path = tmp_path / "empty"
        path.mkdir()
        args[3] = str(path)
    elif case == "other student":  # (named as the run's latest checkpoint, the one its processes load)
        args.append("student.model_kwargs.embed_dim=48")
        path = latest_checkpoint(run_dir / "checkpoints")
    elif case in ("bad reference", "reference of an unknown task", "reference of no scored task"):
        path = tmp_path / "reference.json"
        texts = {"bad reference": "{not json", "reference of an unknown task": '{"semseg": 60.0, "sky": 1}'}
        path.write_text(texts.get(case, '{"depth": 0.5}'))  # NYUD's task: PASCAL has no depth
        args += ["--reference", str(path)]
    elif case == "canvas not a multiple":
        args.append("data.options.eval_size=[50, 64]")
    elif case == "canvas of a fixed-size student":
        args.append("student.model_kwargs.dynamic_img_size=false")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(path=path) in err and len(err.splitlines()) == 1, err


def test_eval_scores_the_recipes_eval_split_unless_split_is_given(trained, tmp_path):
    recipe_file, run_dir, _ = trained
    args = ["eval", str(recipe_file), "--checkpoint", str(run_dir), "--out", str(tmp_path / "r.json")]
    assert main([*args, "eval.split=train"]) == 0  # (--split val always won over it)
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["split"], result["n_images"]) == ("train", 4)
    assert main([*args, "eval.split=train", "--split", "val"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["n_images"] == 5


def test_eval_names_the_image_whose_prediction_is_not_finite(trained, capsys, monkeypatch):
    from sak.engine import task_eval

    recipe_file, run_dir, _ = trained
    load_student = task_eval.load_student

    def with_a_nan_head(recipe, checkpoint):
        model, config = load_student(recipe, checkpoint)
        model.heads["saliency"].register_forward_hook(lambda module, args, out: out * float("nan"))
        return model, config

    monkeypatch.setattr(task_eval, "load_student", with_a_nan_head)
    assert main(["eval", str(recipe_file), "--checkpoint", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "sak: error: image '2009_" in err
        and "of pascal_context/val: saliency: the prediction holds NaN or infinite" in err
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.options.eval_size=[48, 64]", "the student takes 64x64 inputs but the evaluation canvas is 48x64"),
        ("data.options.crop_size=[64, 96]", "the student takes 64x64 inputs but the training crop is 64x96"),
        ("data.options.crop_size=[64, 72]", "data.options.crop_size [64, 72] is not a multiple of the student's patch"),
    ],
)
def test_train_refuses_samples_a_fixed_size_student_cannot_take_before_any_step(override, message, trained, capsys):
    """The training crop and the evaluation canvas are checked when training starts: a whole run trained, then
    failed at its final evaluation with timm's AssertionError and no checkpoint."""
    recipe_file, run_dir, _ = trained
    name = "fixed_" + override.split("=")[0].rsplit(".", 1)[1] + override[-3:-1]
    args = ["train", str(recipe_file), f"run.name={name}", "student.model_kwargs.dynamic_img_size=false"]
    if "crop_size" in override:  # a fixed student at data.image_size takes the evaluation canvas only at that size
        args.append("data.options.eval_size=[64, 64]")
    assert main([*args, override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (run_dir.parent / name / "metrics.jsonl").exists()  # refused before the first step


def test_eval_tasks_keeps_the_datasets_tasks_and_checks_the_class_count():
    from sak.engine.task_eval import EvalError, eval_tasks

    tasks = eval_tasks("nyud", {"tasks": [{"name": "semseg", "channels": 40}, {"name": "parts", "channels": 7}]})
    assert list(tasks) == ["semseg"]  # NYUD has no parts
    with pytest.raises(EvalError, match="the student's semseg head has 5 channels; pascal_context has 21 classes"):
        eval_tasks("pascal_context", {"tasks": [{"name": "semseg", "channels": 5}]})
    with pytest.raises(
        EvalError, match=r"the student has none of the tasks \['semseg', 'depth', 'normals', 'edges'\] of nyud"
    ):
        eval_tasks("nyud", {"tasks": [{"name": "parts", "channels": 7}]})


def test_delta_m_leaves_out_a_task_with_nothing_scored_and_refuses_a_zero_reference(tmp_path):
    """parts on a split without people scores NaN, which made delta_m NaN (null, "+nan%"); a reference of 0
    crashed with a ZeroDivisionError traceback."""
    from sak.engine.task_eval import EvalError, SampleScores, load_reference, summarize

    scorer = SampleScores("pascal_context", ["semseg", "parts"])
    scores = {
        "semseg": {scorer.metrics["semseg"].headline: 40.0},
        "parts": {scorer.metrics["parts"].headline: math.nan},
    }
    with pytest.warns(RuntimeWarning, match=r"delta_m leaves out \['parts'\]: nothing was scored"):
        summary = summarize(scorer, scores, {"semseg": 50.0, "parts": 60.0})
    assert summary["delta_m_tasks"] == ["semseg"] and summary["delta_m"] == pytest.approx(-20.0)
    for bad in ("0", "NaN", "-10", "1" + "0" * 400):  # (a negative value flipped delta_m's sign; a huge int
        (tmp_path / "ref.json").write_text(f'{{"semseg": {bad}}}')  # was an OverflowError traceback)
        with pytest.raises(EvalError, match="reference values must be finite and above 0"):
            load_reference(tmp_path / "ref.json")
    for text in (b'{"semseg": 50.0}\xff', b'{"semseg": 1' + b"0" * 5000 + b"}"):  # (UTF-8; Python's digit limit)
        (tmp_path / "ref.json").write_bytes(text)
        with pytest.raises(EvalError, match=r"ref.json: cannot read the reference JSON"):
            load_reference(tmp_path / "ref.json")


def test_eval_preds_does_not_offer_a_recipe_key_it_cannot_set_for_a_missing_label(evaluated, trained, tmp_path, capsys):
    """A missing ground-truth file suggested data.options.skip_bad, which eval-preds cannot set (and published
    scores must not skip a sample)."""
    _, preds = evaluated
    _, _, root = trained
    copy = shutil.copytree(root, tmp_path / "PASCAL_MT")
    first = (copy / "ImageSets" / "Context" / "val.txt").read_text().split()[0]
    victim = next((copy / "sal_distill").glob(f"{first}.*"))
    victim.unlink()
    args = ["eval-preds", "--dataset", "pascal_context", "--root", str(copy), "--preds", str(preds)]
    assert main([*args, "--tasks", "saliency"]) == 2
    err = capsys.readouterr().err
    assert victim.stem in err and "skip_bad" not in err and "restore the file from the dataset's archive" in err
