"""`optim.decay`: which parameters AdamW's weight decay reaches."""

from __future__ import annotations

import torch

from sak.config import load_recipe
from sak.engine.build import build_optimizer, build_student, build_tasks, build_teachers

from ..conftest import TESTS


def groups(*overrides: str) -> list[tuple[float, set[str]]]:
    recipe = load_recipe(TESTS / "tiny_multitask.yaml", list(overrides))
    student = build_student(recipe, build_teachers(recipe, torch.device("cpu")), build_tasks(recipe))
    names = {id(p): n for n, p in student.named_parameters()}
    return [
        (g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in build_optimizer(recipe, student).param_groups
    ]


def test_matrices_alone_decay_by_default_and_every_parameter_with_decay_all():
    (wd, matrices), (flat_wd, flat) = groups("optim.weight_decay=0.05")
    assert (wd, flat_wd) == (0.05, 0.0)
    assert "stem.vit.pos_embed" in flat and "stem.vit.cls_token" in flat
    assert any(n.endswith("norm1.weight") for n in flat) and any(n.endswith(".bias") for n in flat)
    assert all(not n.endswith(".bias") for n in matrices) and any(n.endswith("qkv.weight") for n in matrices)
    # the official SAK code: AdamW(model.parameters(), weight_decay=...): the same two groups, both decayed
    assert groups("optim.weight_decay=0.05", "optim.decay=all") == [(0.05, matrices), (0.05, flat)]
