"""Each baseline trains from its recipe in the same harness as SAK."""

import json

import pytest
import torch
import yaml

from sak.engine import train
from sak.engine.build import build_student, build_tasks, build_teachers

from ..conftest import REPO

BASELINES = sorted((REPO / "recipes" / "baselines").glob("*.yaml"))


def test_the_four_comparisons_have_recipes():
    names = {p.stem for p in BASELINES}
    assert {"mt_baseline", "many_to_one", "single_teacher", "sak"} <= names


@pytest.mark.parametrize("path", BASELINES, ids=lambda p: p.stem)
def test_baseline_trains_on_tiny_models(path, tiny_recipe):
    tiny = [  # the shipped recipe's structure, with tiny models and generated data for a CPU test
        "student.model=vit_small_patch16_224",
        "student.model_kwargs={embed_dim: 32, depth: 4, num_heads: 2}",
        "student.pretrained=null",
        "data.name=synthetic", "data.root=null", "data.image_size=64", "data.batch_size=2",
        "data.options={length: 8}", "data.num_workers=0", "eval.batch_size=2", "eval.batches=1",
        "schedule.max_steps=4", "schedule.warmup_steps=0", "logging.every=1", "logging.progress=false",
        "logging.wandb.mode=disabled", "checkpoint.every=0",
    ]  # fmt: skip
    data = yaml.safe_load(path.read_text())
    for i, _ in enumerate(data.get("teachers", [])):
        tiny.append(f"teachers.{i}.name=timm")
        tiny.append(f"teachers.{i}.weights=null")
        tiny.append(f"teachers.{i}.image_size=null")
        tiny.append(
            f"teachers.{i}.options={{model: vit_small_patch16_224, model_kwargs: {{embed_dim: {40 + 8 * i}, depth: 4, num_heads: 2, img_size: 64}}}}"
        )
    recipe = tiny_recipe(*tiny, path=path)
    final = train(recipe)
    rows = [json.loads(x) for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(v == v for v in final.values())  # finite, not NaN
    teachers = build_teachers(recipe, torch.device("cpu"))
    student = build_student(recipe, teachers, build_tasks(recipe))
    assert type(student).__name__ == {"sak": "SAKStudent"}.get(recipe.student.architecture, "ManyToOneStudent")
