"""`precision.teacher_weights: cast`: every teacher family runs wholly in bf16 once its weights are cast,
gives float32 maps close to its autocast and float32 ones, and the recipe key is checked and applied."""

import pytest
import torch
import torch.nn.functional as F

from sak.config import RecipeError
from sak.engine import train
from sak.engine.build import build_teachers
from sak.engine.cache import identity
from sak.teachers import TeacherSpec, create_teacher
from tests.teachers.test_clip import TIMM as CLIP_TIMM
from tests.teachers.test_dinov2 import HF_TINY
from tests.teachers.test_sam import ENCODER, randomise
from tests.teachers.test_sam import TIMM as SAM_TIMM

TEACHERS = {  # id: (registry name, input size, options); random tiny networks, and two offline real ones
    "sam/segment_anything": (
        "sam",
        64,
        {"source": "segment_anything", "model_kwargs": {**ENCODER, "use_rel_pos": True}},
    ),
    "sam/timm": ("sam", 64, {"source": "timm", "model_kwargs": SAM_TIMM}),
    "clip/timm": ("clip", 64, {"model_kwargs": CLIP_TIMM}),
    "dinov2/timm": ("dinov2", 56, {"model_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}}),
    "dinov2/transformers": ("dinov2", 56, {"source": "transformers", "model_kwargs": HF_TINY}),
    "efficientnet_lite0": ("efficientnet_lite0", 64, {}),
    "hed": ("hed", 64, {}),
}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("tid", list(TEACHERS))
def test_cast_teacher_runs_in_bf16_and_stays_close_to_autocast(tid):
    name, size, options = TEACHERS[tid]
    torch.manual_seed(0)
    reference = create_teacher(name, spec=TeacherSpec(image_size=size), **options)
    if name == "sam":
        randomise(reference)  # non-zero relative-position tables and position embedding
    cast = create_teacher(name, spec=TeacherSpec(image_size=size), **options)
    cast.load_state_dict(reference.state_dict())
    assert cast.cast_weights(torch.bfloat16) is cast
    assert {p.dtype for p in cast.parameters()} == {torch.bfloat16} and not any(
        p.requires_grad for p in cast.parameters()
    )
    seen = set()  # the dtypes of the float tensors every module with weights is given
    for m in cast.modules():
        if any(True for _ in m.parameters(recurse=False)):
            m.register_forward_pre_hook(lambda m, args: seen.update(a.dtype for a in args if torch.is_tensor(a)))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fp32, autocast = reference.encode(images), reference.encode(images, torch.bfloat16)
    out = cast.encode(images, torch.bfloat16)
    assert cast.encode(images).levels[0].shape == out.levels[0].shape  # a float32 request runs in bf16 too
    for a, b, c in zip(fp32.levels, autocast.levels, out.levels, strict=True):
        assert c.dtype == torch.float32 and c.shape == a.shape and c.is_contiguous()
        assert cosine(c, b) > 0.99 and cosine(c, a) > 0.99, (cosine(c, b), cosine(c, a))
    assert seen == {torch.bfloat16}  # no module saw float32 input: the whole forward ran in bf16


def test_recipe_key_casts_the_teachers_and_refuses_float32(tiny_recipe):
    recipe = tiny_recipe("precision.mixed=bf16", "precision.teacher_weights=cast")
    teachers = build_teachers(recipe, torch.device("cpu"))
    assert all(t.weights_dtype == torch.bfloat16 for t in teachers.values())
    assert {p.dtype for t in teachers.values() for p in t.parameters()} == {torch.bfloat16}
    # the teachers alone in bf16, the student in float32
    only_teachers = tiny_recipe("precision.teachers=bf16", "precision.teacher_weights=cast")
    assert all(t.weights_dtype == torch.bfloat16 for t in build_teachers(only_teachers, torch.device("cpu")).values())
    assert all(t.weights_dtype is None for t in build_teachers(tiny_recipe(), torch.device("cpu")).values())
    with pytest.raises(RecipeError, match=r"teacher_weights: cast needs bf16 or fp16 teachers.*precision.mixed 'no'"):
        tiny_recipe("precision.teacher_weights=cast")
    with pytest.raises(RecipeError, match=r"teacher_weights: cast needs .* precision.teachers is 'fp32'"):
        tiny_recipe("precision.mixed=bf16", "precision.teachers=fp32", "precision.teacher_weights=cast")
    with pytest.raises(RecipeError, match="precision.teacher_weights"):
        tiny_recipe("precision.teacher_weights=half")


def test_training_with_cast_teachers_and_the_cache_tells_them_from_autocast(tiny_recipe):
    recipe = tiny_recipe("precision.mixed=bf16", "precision.teacher_weights=cast", "schedule.max_steps=2")
    final = train(recipe)
    assert final["val/loss"] > 0 and all(torch.isfinite(torch.tensor(v)) for v in final.values())
    autocast = tiny_recipe("precision.mixed=bf16")
    cpu = torch.device("cpu")
    cast_id = identity(recipe, build_teachers(recipe, cpu), 1, False, "fp16")
    autocast_id = identity(autocast, build_teachers(autocast, cpu), 1, False, "fp16")
    # a cache built from autocast teachers is stale for cast ones (other features), and the other way round
    assert (autocast_id["teacher_precision"], cast_id["teacher_precision"]) == ("bfloat16", "bfloat16 (weights cast)")
    assert {k: v for k, v in cast_id.items() if k != "teacher_precision"} == {
        k: v for k, v in autocast_id.items() if k != "teacher_precision"
    }
