"""Rules every registered teacher follows alike: which levels it accepts, what a pinned sha256 needs, and
that `create_teacher` leaves the caller's spec alone."""

import re

import pytest
from safetensors.torch import save_file

from sak.teachers import TeacherOutput, TeacherSpec, create_teacher
from sak.teachers.weights import WeightsError

VIT = {"embed_dim": 32, "depth": 4, "num_heads": 2, "img_size": 56}
OPEN_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 4, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
SAM = {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "window_size": 4}
# tiny random models with 4 blocks, through every source whose library orders its outputs its own way
TINY = {
    "timm": ("timm", {"model": "vit_small_patch14_dinov2", "model_kwargs": VIT}),
    "dinov2": ("dinov2", {"source": "timm", "model_kwargs": VIT}),
    "clip-timm": ("clip", {"source": "timm", "model_kwargs": {**VIT, "img_size": 32, "patch_size": 8}}),
    "clip-open_clip": ("clip", {"source": "open_clip", "model": "ViT-B-16", "model_kwargs": OPEN_CLIP}),
    "sam-segment_anything": ("sam", {"source": "segment_anything", "model_kwargs": {**SAM, "out_chans": 16}}),
    "sam-timm": ("sam", {"source": "timm", "model_kwargs": {**SAM, "neck_chans": 16}}),
}


@pytest.mark.parametrize("levels", [[2, 0], [1, 1], [0, 2, 2]])
@pytest.mark.parametrize("case", sorted(TINY))
def test_levels_out_of_order_or_repeated_are_errors_naming_the_teacher(case, levels):
    """timm and segment_anything would return such levels in block order without repeats, transformers and
    open_clip in the requested order: the same recipe would pair different maps with the student's levels."""
    name, options = TINY[case]
    wanted = rf"^{name} teacher.*: levels {re.escape(str(levels))} must be block indices in 0\.\.3, each once and in"
    with pytest.raises(ValueError, match=wanted):
        create_teacher(name, spec=TeacherSpec(levels=levels), **options)
    assert create_teacher(name, spec=TeacherSpec(levels=[0, 3]), **options).meta.levels == (0, 3)


@pytest.mark.parametrize(
    ("name", "options", "tag"),
    [
        ("timm", {"model": "vit_base_patch16_clip_224"}, "openai"),
        ("clip", {"source": "timm", "model": "vit_base_patch16_clip_224"}, "openai"),
        ("clip", {"source": "open_clip", "model": "ViT-B-16"}, "openai"),
        ("clip", {"source": "open_clip", "model": "ViT-B-16"}, "hf-hub:timm/vit_base_patch16_clip_224.openai"),
        ("sam", {"source": "timm"}, "sa1b"),
        ("dinov2", {}, "lvd142m"),
    ],
)
def test_a_sha256_with_a_hub_tag_or_random_weights_is_an_error_not_ignored(name, options, tag):
    """Raised before anything is downloaded: a digest can only be checked against a local file."""
    with pytest.raises(
        WeightsError, match=f"^{name} teacher.*: sha256 needs a local file; '{re.escape(tag)}' is a hub"
    ):
        create_teacher(name, tag, spec=TeacherSpec(sha256="0" * 64), **options)
    with pytest.raises(WeightsError, match="sha256 needs a local file; no `weights` .random."):
        create_teacher(name, spec=TeacherSpec(sha256="0" * 64), **options)


def test_create_teacher_does_not_change_the_callers_spec(tmp_path):
    spec = TeacherSpec(levels=[1, 3])
    with pytest.raises(WeightsError, match="does not exist"):
        create_teacher("timm", str(tmp_path / "nope.safetensors"), spec=spec, model="vit_small_patch14_dinov2")
    assert spec == TeacherSpec(levels=[1, 3])  # the same spec can build the next teacher with its own weights
    teacher = create_teacher("timm", spec=spec, model="vit_small_patch14_dinov2", model_kwargs=VIT)
    assert teacher.meta.weights == "random" and teacher.meta.levels == (1, 3)


def test_unreadable_or_unfitting_weights_files_are_named_in_the_error(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="timm teacher .*cannot read .*junk.safetensors' as safetensors"):
        create_teacher("timm", str(tmp_path / "junk.safetensors"), model="vit_small_patch14_dinov2", model_kwargs=VIT)
    model = create_teacher("timm", model="vit_small_patch14_dinov2", model_kwargs=VIT).model
    save_file({k: v for k, v in model.state_dict().items() if k != "norm.bias"}, str(tmp_path / "short.safetensors"))
    with pytest.raises(WeightsError, match=r"short.safetensors' does not fit the model \(1 missing keys, e.g. \['norm"):
        create_teacher("timm", str(tmp_path / "short.safetensors"), model="vit_small_patch14_dinov2", model_kwargs=VIT)


def fixed_levels_teacher(returned: int = 4) -> type:
    """A teacher in the shape of the docs' my_conv before it read spec.levels: four levels, whatever is asked;
    its forward returns `returned` maps."""
    from dataclasses import dataclass

    import torch
    from torch import nn

    from sak.teachers import Teacher, TeacherMeta, TeacherOutput

    class Fixed(Teacher):
        @dataclass
        class Options:
            pass

        def __init__(self, spec, options) -> None:
            super().__init__(spec)
            self.conv = nn.Conv2d(3, 8, 4, stride=4)
            self.meta = TeacherMeta(
                name="fixed", source="test", architecture="Fixed", embed_dim=8, patch_size=4, native_size=16,
                mean=(0.5,) * 3, std=(0.5,) * 3, levels=(0, 1, 2, 3),
            )  # fmt: skip

        def forward(self, x: torch.Tensor) -> TeacherOutput:
            return TeacherOutput(levels=(self.conv(x),) * returned, summary=None)

    return Fixed


def test_a_teacher_that_ignores_the_recipes_levels_is_refused(monkeypatch):
    """`teachers[].levels` used to be dropped silently by a plug-in that hard-coded its levels."""
    from sak.registry import TEACHERS

    monkeypatch.setitem(TEACHERS._entries, "fixed_levels", fixed_levels_teacher())
    assert create_teacher("fixed_levels").meta.levels == (0, 1, 2, 3)
    with pytest.raises(ValueError, match=r"levels \[1, 3\] were asked for .*but it gives \[0, 1, 2, 3\].*check_levels"):
        create_teacher("fixed_levels", spec=TeacherSpec(levels=[1, 3]))


def test_a_forward_that_breaks_the_teachers_promised_levels_is_named():
    """Not 'student gives 4 levels, teacher 3' from the loss after the first step: the teacher and both counts."""
    import torch

    teacher = fixed_levels_teacher(returned=3)(TeacherSpec(), None)
    with pytest.raises(
        ValueError, match=r"teacher fixed: its forward returned 3 level\(s\) .*promises 4 of \[8, 8, 8, 8\]"
    ):
        teacher.encode(torch.rand(1, 3, 16, 16))


def test_maps_of_other_sizes_than_the_teacher_promises_are_named():
    """A plug-in whose maps are not input / stride a side (here upsampled twice): `sak cache build` wrote them into
    shards laid out for the promised size, a cache training then refused as "rebuild it", and online training
    took them without a word."""
    import torch
    import torch.nn.functional as F

    class Upsampled(fixed_levels_teacher()):
        def forward(self, x):
            return TeacherOutput(tuple(F.interpolate(t, scale_factor=2.0) for t in super().forward(x).levels), None)

    with pytest.raises(
        ValueError,
        match=r"teacher fixed: its forward returned maps of \(C, h, w\) \[\(8, 8, 8\), .* for images of \(16, 16\) "
        r"\(input 16\), but its level_shapes\(\) promise \[\(8, 4, 4\), .*override",
    ):
        Upsampled(TeacherSpec(), None).encode(torch.rand(1, 3, 16, 16))
    assert [
        t.shape[1:] for t in fixed_levels_teacher()(TeacherSpec(), None).encode(torch.rand(1, 3, 16, 16)).levels
    ] == [(8, 4, 4)] * 4


def test_a_forward_that_returns_no_teacher_output_or_a_teacher_without_meta_is_named(monkeypatch):
    """Not "'Tensor' object has no attribute 'levels'" or "no attribute 'input_size'" from deep inside sak."""
    import torch

    from sak.registry import TEACHERS

    class Bare(fixed_levels_teacher()):
        def forward(self, x):
            return super().forward(x).levels[0]

    with pytest.raises(TypeError, match=r"teacher fixed: its forward returned a Tensor; it must return TeacherOutput"):
        Bare(TeacherSpec(), None).encode(torch.rand(1, 3, 16, 16))

    class NoMeta(fixed_levels_teacher()):
        def __init__(self, spec, options) -> None:
            super().__init__(spec, options)
            del self.meta

    monkeypatch.setitem(TEACHERS._entries, "no_meta", NoMeta)
    with pytest.raises(
        ValueError, match=r"teacher 'no_meta' \(NoMeta\): its __init__ must set self.meta = TeacherMeta"
    ):
        create_teacher("no_meta")


def test_a_teacher_constructor_of_another_signature_is_named(monkeypatch):
    from sak.registry import TEACHERS

    class OneArgument(fixed_levels_teacher()):
        def __init__(self, spec) -> None:
            super().__init__(spec, None)

    monkeypatch.setitem(TEACHERS._entries, "one_argument", OneArgument)
    with pytest.raises(
        ValueError, match=r"teacher 'one_argument' \(OneArgument\): the constructor must take \(spec, options\)"
    ):
        create_teacher("one_argument")


def test_a_misspelt_normalization_through_the_python_api_is_an_error():
    """A recipe refuses it; TeacherSpec(normalization="ImageNet") silently meant "own"."""
    with pytest.raises(ValueError, match="teacher normalization 'ImageNet': expected 'own' or 'imagenet'"):
        TeacherSpec(normalization="ImageNet")


@pytest.mark.parametrize("case", ["dinov2", "clip-open_clip", "sam-segment_anything"])
def test_float_images_out_of_0_1_are_refused_not_encoded_as_white_or_grey(case):
    """Float images of 0..255, or already mean/std normalised, used to give the features of a saturated image
    (the resize clamps to [0, 1]) without a word; uint8 and float in [0, 1] give the same features."""
    import torch

    name, options = TINY[case]
    teacher = create_teacher(name, **options)
    images = torch.randint(0, 256, (2, 3, 40, 48), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"float images must be in \[0, 1\], got values in \[0, 255\]: divide .*255"):
        teacher.encode(images.float())
    normalised = (images.float() / 255 - 0.45) / 0.225
    with pytest.raises(ValueError, match=r"got values in \[-2, 2.44\]: pass them before mean/std \(or pass uint8\)"):
        teacher.encode(normalised)
    for a, b in zip(teacher.encode(images).levels, teacher.encode(images.float() / 255).levels, strict=True):
        torch.testing.assert_close(a, b)
