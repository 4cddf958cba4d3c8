"""student.input_size: the [H, W] the stem is built for (its position-embedding grid), checked in the recipe, at
build, and against the samples before training (the NYUD chain through the shipped recipes is in
test_sak_recipes.py)."""

import pytest
import torch

from sak.config import RecipeError, load_recipe

from ..conftest import TINY


@pytest.mark.parametrize("size", ["[448]", "[0, 64]", "[64, 64, 3]"])
def test_student_input_size_is_a_height_and_a_width(size):
    with pytest.raises(RecipeError, match=r"student.input_size: \[height, width\] in pixels"):
        load_recipe(TINY, [f"student.input_size={size}"])


def test_a_student_input_size_its_patch_does_not_tile_is_refused_naming_it():
    from sak.engine.build import build_student, build_tasks, build_teachers

    recipe = load_recipe(TINY, ["student.input_size=[48, 72]"])
    with pytest.raises(
        ValueError, match=r"student.input_size \[48, 72\]: 72 is not a multiple of the student's patch size 16"
    ):
        build_student(recipe, build_teachers(recipe, torch.device("cpu")), build_tasks(recipe))
    recipe = load_recipe(TINY, ["student.input_size=[48, 80]"])
    stem = build_student(recipe, build_teachers(recipe, torch.device("cpu")), build_tasks(recipe)).stem
    assert tuple(stem.vit.patch_embed.grid_size) == (3, 5)


def test_a_student_built_for_another_size_than_a_square_dataset_is_refused_before_training(tmp_path):
    """Generated or folder images are data.image_size square: a student built for [48, 64] without
    dynamic_img_size failed at the first step with timm's bare AssertionError."""
    from sak.engine import train

    recipe = load_recipe(TINY, [f"run.output_dir={tmp_path}", "student.input_size=[48, 64]"])
    with pytest.raises(RecipeError, match=r"takes 48x64 inputs but the samples' size is 64x64: set data.image_size "
                       r"\(or student.input_size"):  # fmt: skip
        train(recipe)
    assert not list((recipe.run_dir / "checkpoints").glob("step_*"))
