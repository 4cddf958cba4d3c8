"""`resize: keep`: a ViT teacher sees the loader image at its own size, as the official SAK code feeds its teachers
(NYUD's 448 x 576 crops: DINOv2 32 x 41 tokens, CLIP-B/16 28 x 36), not resized to a square."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn

from sak.config import RecipeError, load_recipe
from sak.teachers import TeacherSpec, create_teacher
from sak.teachers.base import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, normalize, to_float01

from ..conftest import TINY

VIT = {"embed_dim": 32, "depth": 3, "num_heads": 2}
KEEP = TeacherSpec(resize="keep")


def official(name: str, teacher, kwargs: dict, size: tuple[int, int]) -> torch.nn.Module:
    """What the official code builds: timm's model at the (H, W) of its input, the teacher's weights loaded
    through timm's filter (which resamples the position embeddings once, to that grid)."""
    net = timm.create_model(name, num_classes=0, **{**kwargs, "img_size": size})
    net.load_state_dict(checkpoint_filter_fn(teacher.state_dict(), net))
    return net.eval()


@pytest.mark.parametrize(
    ("name", "options", "timm_name", "kwargs", "mean_std", "grid"),
    [
        ("dinov2", {"size": "small", "source": "timm"}, "vit_small_patch14_dinov2", VIT,
         (IMAGENET_MEAN, IMAGENET_STD), (5, 8)),  # 70 x 120 -> 70 x 112: the last 8 columns are cut
        ("clip", {"source": "timm", "model": "vit_base_patch16_clip_384"}, "vit_base_patch16_clip_384",
         {**VIT, "patch_size": 8, "img_size": 32}, (CLIP_MEAN, CLIP_STD), (8, 15)),
    ],
)  # fmt: skip
def test_a_kept_image_gives_the_features_of_the_official_codes_teacher(name, options, timm_name, kwargs, mean_std,
                                                                        grid):  # fmt: skip
    torch.manual_seed(0)
    teacher = create_teacher(name, spec=KEEP, **options, model_kwargs=kwargs)
    assert teacher.meta.resize == "keep" and "every forward" in str(teacher.meta.extra)
    images = torch.randint(0, 256, (2, 3, 70, 120), dtype=torch.uint8)
    out = teacher.encode(images)
    assert [tuple(m.shape[-2:]) for m in out.levels] == [grid] * 3
    assert teacher.map_shapes((70, 120)) == [(32, *grid)] * 3
    net = official(timm_name, teacher.backbone.model if name == "dinov2" else teacher.tower.model, kwargs, (70, 120))
    with torch.no_grad():  # the whole image: the patch embedding's stride leaves the columns past the grid unread
        _, maps = net.forward_intermediates(normalize(to_float01(images), *mean_std), indices=[0, 1, 2], norm=False)
    for got, want in zip(out.levels, maps, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # another size through the same teacher: its own grid, no rebuild
    assert [tuple(m.shape[-2:]) for m in teacher.encode(images[..., :56, :56]).levels][0] == (
        (4, 4) if name == "dinov2" else (7, 7)
    )


def test_keep_is_refused_where_the_teacher_cannot_take_it():
    """A teacher that sizes its input itself, or a library that resamples by another rule, says so; and an
    image_size beside keep (it would only resample the position embeddings twice) is named in the recipe."""
    with pytest.raises(ValueError, match="resize 'keep' is for source timm"):
        create_teacher("dinov2", spec=KEEP, size="small", source="transformers",
                       model_kwargs={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2})  # fmt: skip
    with pytest.raises(ValueError, match="it needs source timm, not open_clip"):
        create_teacher("clip", spec=KEEP, source="open_clip")
    with pytest.raises(ValueError, match="it needs source timm and no center_crop"):
        create_teacher("clip", spec=KEEP, center_crop=True, model_kwargs={**VIT, "patch_size": 8, "img_size": 32})
    with pytest.raises(ValueError, match=r"teacher 'timm': resize 'keep' was asked for .* \(square\)"):
        create_teacher("timm", spec=KEEP, model="vit_small_patch16_224", model_kwargs={**VIT, "img_size": 32})
    with pytest.raises(ValueError, match="image_size"):
        TeacherSpec(resize="keep", image_size=448)
    with pytest.raises(RecipeError, match=r"tiny.yaml: teachers\[0\]: teacher resize 'keep' .* image_size \(64\)"):
        load_recipe(TINY, ["teachers.0.resize=keep", "teachers.0.image_size=64"])
    with pytest.raises(RecipeError, match=r"teachers\[0\]\.resize: 'stretch' is not one of 'own', 'keep'"):
        load_recipe(TINY, ["teachers.0.resize=stretch"])
    # a teacher that cannot take it: refused with the recipe, before its weights are fetched
    with pytest.raises(RecipeError, match=r"teachers\[0\]\.resize: teacher 'timm' sizes .* 'keep' is for clip, dinov2"):
        load_recipe(TINY, ["teachers.0.resize=keep"])


def test_a_cache_of_a_kept_teacher_stores_and_describes_its_grid(tiny_recipe, tmp_path):
    from sak.engine.cache import build_cache
    from sak.engine.cache.store import describe

    kept = ["teachers.0.name=dinov2", "teachers.0.resize=keep",
            "teachers.0.options={size: small, source: timm, model_kwargs: {embed_dim: 48, depth: 4, num_heads: 2}}"]  # fmt: skip
    root = build_cache(tiny_recipe(*kept), tmp_path / "c", shard_size=4)
    lines = "\n".join(describe(root))
    # the 64 px images cut to 56 (4 x 4 tokens at patch 14), not "input 518 px" (the model's native size)
    want = (
        "vit_a: vit_small_patch14_dinov2 from timm, weights random, input the images' own size cut to a multiple of 14"
    )
    assert f"{want}, levels [0, 1, 2, 3]: maps 48x4x4" in lines, lines
