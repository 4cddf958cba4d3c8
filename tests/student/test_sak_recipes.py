"""The shipped SAK recipes (recipes/sak/): published settings, and a stage-1 -> stage-2 chain through their
exact structure on tiny models (stage 2 on the NYUD fixture with non-square crops)."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from sak.config import load_recipe
from sak.data.fixtures import write_nyud
from sak.engine import train
from sak.engine.build import build_student, build_tasks, build_teachers
from sak.engine.checkpoint import CheckpointError, latest_checkpoint
from sak.engine.export import export_student, load_exported
from sak.engine.init import init_student_from

from ..conftest import REPO

SAK = REPO / "recipes" / "sak"
STAGE1 = sorted(SAK.glob("stage1_*.yaml"))
STAGE2 = sorted(SAK.glob("stage2_*.yaml"))
STUDENTS = {"vits": "vit_small_patch16_384", "vitb": "vit_base_patch16_384", "vitl": "vit_large_patch16_384"}
PASCAL_WEIGHTS = {"semseg": 1.0, "parts": 2.0, "saliency": 5.0, "normals": 10.0, "edges": 50.0}
NYUD_WEIGHTS = {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edges": 50.0}


def test_every_student_size_has_both_stages_for_both_datasets():
    assert {p.stem for p in STAGE1} == {f"stage1_{s}" for s in STUDENTS}
    assert {p.stem for p in STAGE2} == {f"stage2_{s}_{d}" for s in STUDENTS for d in ("pascal_context", "nyud")}


@pytest.mark.parametrize("path", STAGE1, ids=lambda p: p.stem)
def test_stage1_recipes_carry_the_published_schedule(path):
    r = load_recipe(path)
    size = path.stem.split("_")[1]
    assert r.run.stage == "distill" and not r.tasks
    assert r.student.model == STUDENTS[size] and r.student.pretrained == "augreg_in21k_ft_in1k"
    assert (r.student.down_ratio, r.student.router) == (4, "noisy")
    assert (r.data.name, r.data.image_size, r.data.batch_size) == ("image_folder", 384, 16)
    assert (r.optim.lr, r.optim.weight_decay, r.optim.grad_clip, r.optim.decay) == (1e-3, 0.01, None, "all")
    s = r.schedule
    assert (s.name, s.epochs, s.warmup_epochs, s.min_lr) == ("cosine", 30, 2, 1e-5)
    assert (r.loss.distill, r.loss.normalize) == ("sak", "none")
    assert [t.id for t in r.teachers] == ["dinov2", "clip", "sam"]
    large = size == "vitl"
    assert r.teachers[0].options["size"] == ("large" if large else "base")
    assert r.teachers[2].options["size"] == ("l" if large else "b")


@pytest.mark.parametrize("path", STAGE2, ids=lambda p: p.stem)
def test_stage2_recipes_carry_the_published_schedule_and_task_weights(path):
    r = load_recipe(path)
    _, size, *dataset = path.stem.split("_")
    dataset = "_".join(dataset)
    assert r.run.stage == "multitask" and r.data.name == dataset
    assert r.student.model == STUDENTS[size]
    assert (r.optim.lr, r.optim.weight_decay, r.optim.grad_clip, r.optim.decay) == (2e-5, 1e-6, 10.0, "all")
    assert (r.schedule.name, r.schedule.max_steps, r.schedule.power) == ("poly", 40000, 0.9)
    assert (r.data.batch_size, r.loss.alpha) == (2, 1.0)
    assert r.student.sync_bn  # the official code's SyncBN: the heads' batch norm over both GPUs' images
    weights = {t.name: t.weight for t in r.tasks}
    assert weights == (PASCAL_WEIGHTS if dataset == "pascal_context" else NYUD_WEIGHTS)
    # teachers: DINOv2 and CLIP see PASCAL's 512 crops at their grid's square (DINOv2 patch 14: 504), NYUD's
    # 448 x 576 as they are (the official code's grids: 32 x 41 at patch 14, 28 x 36 at patch 16); SAM letterboxed
    inputs = [(t.image_size, t.resize) for t in r.teachers]
    if dataset == "nyud":
        assert r.data.options["crop_size"] == [448, 576] and r.student.model_kwargs["dynamic_img_size"]
        assert r.student.input_size == [448, 576]  # a 28 x 36 grid, as the official student is built
        assert inputs == [(None, "keep"), (None, "keep"), (None, "own")]
    else:
        assert r.data.image_size == 512 and r.student.input_size is None
        assert inputs == [(504, "own"), (504 if size == "vitl" else 512, "own"), (None, "own")]
    assert [t.options.get("source") for t in r.teachers] == ["timm"] * 3
    assert r.checkpoint.init_from == f"runs/sak_stage1_{size}"  # the matching stage-1 run's name
    assert load_recipe(SAK / f"stage1_{size}.yaml").run.name == f"sak_stage1_{size}"
    stage1 = yaml.safe_load((SAK / f"stage1_{size}.yaml").read_text())["teachers"]
    assert yaml.safe_load(path.read_text())["teachers"][2] == stage1[2]  # same SAM teacher in both stages


def tiny(path, tmp_path, *extra):
    """The shipped recipe with tiny timm teachers and student (its structure, keys and adapters kept)."""
    overrides = [
        f"run.output_dir={tmp_path}", "student.pretrained=null", "schedule.warmup_epochs=0",
        "logging.every=1", "logging.progress=false", "logging.wandb.mode=disabled", "checkpoint.every=0",
        "eval.batches=1", "eval.batch_size=2", "data.num_workers=0", "precision.mixed=no",
    ]  # fmt: skip
    for i, teacher in enumerate(yaml.safe_load(path.read_text())["teachers"]):
        vit = f"embed_dim: {24 + 8 * i}, depth: 4, num_heads: 2"
        if teacher.get("resize") == "keep":  # the recipe's teacher, tiny (a timm teacher does not take `keep`)
            options = {"dinov2": f"{{size: small, source: timm, model_kwargs: {{{vit}, img_size: 56}}}}",
                       "clip": f"{{source: timm, model: vit_base_patch16_clip_384, model_kwargs: {{{vit}, "
                               "img_size: 32, patch_size: 8}}"}[teacher["name"]]  # fmt: skip
            overrides += [f"teachers.{i}.weights=null", f"teachers.{i}.options={options}"]
            continue
        overrides += [f"teachers.{i}.name=timm", f"teachers.{i}.weights=null", f"teachers.{i}.image_size=null",
                      f"teachers.{i}.options={{model: vit_small_patch16_224, model_kwargs: "
                      f"{{{vit}, img_size: 32}}}}"]  # fmt: skip
    return load_recipe(path, [*overrides, *extra])


def test_stage1_then_stage2_on_nyud_through_the_shipped_recipes(tmp_path):
    """Stage 1 at 64 px (synthetic images stand in for ImageNet), stage 2 on the NYUD fixture with 48 x 64
    crops (non-square, as SAK's 448 x 576): the stem's position embeddings go from a 4 x 4 grid to the crops'
    3 x 4 (student.input_size, as the official student learns 28 x 36; they were a 3 x 3 grid resampled to
    3 x 4 at every forward), and stage 2 starts from the stage-1 weights."""
    s1 = tiny(SAK / "stage1_vitb.yaml", tmp_path, "student.model_kwargs={embed_dim: 32, depth: 4, num_heads: 2}",
              "data.name=synthetic", "data.root=null", "data.image_size=64", "data.batch_size=2",
              "data.options={length: 4}", "schedule.epochs=null", "schedule.max_steps=2")  # fmt: skip
    train(s1)
    root = write_nyud(tmp_path / "NYUD_MT", n_train=4, n_val=2, size=(40, 56))
    s2 = tiny(SAK / "stage2_vitb_nyud.yaml", tmp_path,
              "student.model_kwargs={embed_dim: 32, depth: 4, num_heads: 2, dynamic_img_size: true}",
              f"data.root={root}", "data.image_size=48", "data.options={crop_size: [48, 64], eval_size: [48, 64]}",
              "student.input_size=[48, 64]",
              "schedule.max_steps=2", f"checkpoint.init_from={s1.run_dir}", "eval.at_start=true")  # fmt: skip
    final = train(s2)
    assert all(v == v for v in final.values())  # finite
    log = [json.loads(x) for x in (s2.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert {"task/semseg", "task/depth", "task/normals", "task/edges"} <= set(log[1])
    # the stage-2 student starts from stage 1: same stem blocks and adapters, grid resampled
    teachers = build_teachers(s2, torch.device("cpu"))
    # DINOv2 and CLIP saw the 48 x 64 crops as they are, cut to their patch (14: 42 x 56; 8: the whole crop);
    # the tiny timm teacher standing in for SAM, its square 32 px
    assert [t.meta.resize for t in teachers.values()] == ["keep", "keep", "square"]
    assert [t.map_shapes((48, 64))[0][1:] for t in teachers.values()] == [(3, 4), (6, 8), (2, 2)]
    student = build_student(s2, teachers, build_tasks(s2))
    missing = init_student_from(student, s1.run_dir)
    assert missing and all(k.startswith(("routers.", "heads.")) for k in missing)
    assert student.stem.vit.pos_embed.shape[1] == 1 + 3 * 4
    # the export rebuilds the stem at that size too
    out = export_student(s2, s2.run_dir, tmp_path / "export")
    model, config = load_exported(out)
    assert model.stem.vit.pos_embed.shape[1] == 1 + 3 * 4 and config["student"]["input_size"] == [48, 64]
    # stage 2's 3 x 4 grid (read from the run's recipe.yaml) into a 4 x 3 or a square 4 x 4 student: resampled,
    # where 4 x 3 took it as it was (as many tokens) and 4 x 4 was refused as another student
    saved = load_file(str(latest_checkpoint(s2.run_dir / "checkpoints") / "model.safetensors"))["stem.vit.pos_embed"]
    for size in ([64, 48], [64, 64]):
        other = load_recipe(s2.run_dir / "recipe.yaml", [f"student.input_size={size}", "data.options={}"])
        student = build_student(other, teachers, build_tasks(other))
        init_student_from(student, s2.run_dir)
        grid = [side // 16 for side in size]
        expected = resample_abs_pos_embed(saved, grid, [3, 4], num_prefix_tokens=1, antialias=False)  # as SAK
        torch.testing.assert_close(student.stem.vit.pos_embed.data, expected)
    # resumed with another input size: the error says which one the checkpoint has
    with pytest.raises(CheckpointError, match=r"Resume with student.input_size=\[48, 64\] \(the checkpoint's\)"):
        train(load_recipe(s2.run_dir / "recipe.yaml", ["student.input_size=null"]))
