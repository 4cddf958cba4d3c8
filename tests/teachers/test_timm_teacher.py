"""The generic timm teacher: levels as timm computes them, frozen, any input size, local weights."""

import json
import math

import pytest
import timm
import torch
from safetensors.torch import save_file

from sak.teachers import TeacherSpec, create_teacher
from sak.teachers.timm_teacher import default_levels, feature_levels
from sak.teachers.weights import WeightsError

TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2, "img_size": 56}


def test_default_levels_follow_sak():
    """Every entry of the official code's table (out_indices_cfg: small / base, large, huge, giant, so400m)."""
    official = {12: [2, 5, 8, 11], 24: [5, 11, 17, 23], 32: [7, 15, 23, 31], 40: [9, 19, 29, 39], 27: [6, 13, 20, 26]}
    assert {depth: default_levels(depth) for depth in official} == official
    assert default_levels(4) == [0, 1, 2, 3] and default_levels(3) == [0, 1, 2] and default_levels(6) == [1, 2, 4, 5]


def test_local_safetensors_give_timms_own_intermediates(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **TINY).eval()
    with torch.no_grad():
        for p in ref.parameters():  # every parameter random, including the zero-initialised ones
            p.normal_(0, 0.05)
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    teacher = create_teacher(
        "timm", str(tmp_path / "w.safetensors"), model="vit_small_patch14_dinov2", model_kwargs=TINY
    )
    x = torch.randn(2, 3, 56, 56)
    expected = ref.forward_intermediates(x, indices=[0, 1, 2, 3], norm=False, intermediates_only=True)
    out = teacher(x)
    for a, b in zip(out.levels, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert teacher.meta.sha256 and teacher.meta.source == "timm" and teacher.level_shapes() == [(32, 4, 4)] * 4


def test_frozen_and_eval_forever():
    teacher = create_teacher("timm", model="vit_small_patch14_dinov2", model_kwargs=TINY)
    teacher.train()
    assert not any(m.training for m in teacher.modules()) and not any(p.requires_grad for p in teacher.parameters())
    out = teacher.encode(torch.randint(0, 255, (1, 3, 70, 90), dtype=torch.uint8))
    assert out.levels[0].shape == (1, 32, 4, 4) and not out.levels[0].requires_grad


def test_a_lower_input_size_resamples_position_embeddings_at_run_time(tmp_path):
    teacher = create_teacher(
        "timm", spec=TeacherSpec(image_size=28), model="vit_small_patch14_dinov2", model_kwargs=TINY
    )
    assert teacher.input_size == 28 and teacher.meta.native_size == 56
    out = teacher.encode(torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8))
    assert out.levels[-1].shape == (1, 32, 2, 2)


def test_missing_weights_file_and_wrong_digest_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        create_teacher("timm", str(tmp_path / "nope.safetensors"), model="vit_small_patch14_dinov2", model_kwargs=TINY)
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **TINY)
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    spec = TeacherSpec(weights=str(tmp_path / "w.safetensors"), sha256="0" * 64)
    with pytest.raises(WeightsError, match="sha256 of .* is [0-9a-f]{64}, but the recipe expects 0000"):
        create_teacher("timm", spec=spec, model="vit_small_patch14_dinov2", model_kwargs=TINY)


def test_hub_weights_offline_say_where_they_were_looked_for_and_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="Hugging Face cache.*pass a local file"):
        create_teacher("timm", "hub", model="vit_small_patch14_dinov2")


# ------------------------------------------------------------------------------------------------
# CNNs and other hierarchical models: levels, channels and strides from timm's feature_info
# ------------------------------------------------------------------------------------------------
TINY_CONVNEXT = {"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1)}


@pytest.mark.parametrize(
    ("model", "levels", "shapes"),
    [
        ("convnext_atto", (0, 1, 2, 3), [(40, 56, 56), (80, 28, 28), (160, 14, 14), (320, 7, 7)]),
        ("resnet18", (1, 2, 3, 4), [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]),  # 0: the stem
        # six levels, at strides 1, 2, 4, 8, 16, 32: the deepest four (evenly spaced ones skipped stride 8)
        ("dla34", (2, 3, 4, 5), [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]),
    ],
)
def test_cnn_levels_are_its_stages_and_level_shapes_are_what_forward_returns(model, levels, shapes):
    torch.manual_seed(0)
    teacher = create_teacher("timm", model=model)
    ref = timm.create_model(model, pretrained=False, num_classes=0).eval()
    ref.load_state_dict(teacher.model.state_dict())
    x = torch.randn(1, 3, 224, 224)
    expected = ref.forward_intermediates(x, indices=list(levels), intermediates_only=True)
    out = teacher(x)
    assert teacher.meta.levels == levels and teacher.level_shapes() == shapes
    assert [tuple(t.shape[1:]) for t in out.levels] == shapes and out.summary is None
    for a, b in zip(out.levels, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (teacher.meta.embed_dim, teacher.meta.patch_size) == (shapes[-1][0], 32)
    assert teacher.level_shapes(64) == [(c, 64 * h // 224, 64 * w // 224) for c, h, w in shapes]


def test_cnn_file_with_its_classifier_loads_and_odd_sizes_are_refused(tmp_path):
    """timm's model.safetensors holds the classifier (`head.fc` for a ConvNeXt), which the teacher drops while
    keeping the rest of the head (`head.norm`, applied before pooling); a file that does not fit names itself."""
    torch.manual_seed(0)
    full = timm.create_model("convnext_atto", pretrained=False, **TINY_CONVNEXT).eval()
    save_file(full.state_dict(), str(tmp_path / "model.safetensors"))
    teacher = create_teacher(
        "timm", str(tmp_path / "model.safetensors"), spec=TeacherSpec(levels=[1, 3], image_size=64),
        model="convnext_atto", model_kwargs=TINY_CONVNEXT,
    )  # fmt: skip
    x = torch.randn(1, 3, 64, 64)
    expected = full.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    out = teacher(x)
    assert teacher.level_shapes() == [(16, 8, 8), (64, 2, 2)] == [tuple(t.shape[1:]) for t in out.levels]
    for a, b in zip(out.levels, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    state = {k: v for k, v in full.state_dict().items() if k != "head.norm.weight"}
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsError, match=r"missing.safetensors' does not fit the model .*'head.norm.weight'"):
        create_teacher("timm", str(tmp_path / "missing.safetensors"), model="convnext_atto", model_kwargs=TINY_CONVNEXT)
    with pytest.raises(ValueError, match="image_size must be a multiple of 32 .*level 3.*got 100; .* to 96 or 128"):
        create_teacher("timm", spec=TeacherSpec(image_size=100), model="convnext_atto", model_kwargs=TINY_CONVNEXT)
    with pytest.raises(ValueError, match=r"levels \[3, 4\] must be block indices in 0..3.*strides \[4, 8, 16, 32\]"):
        create_teacher("timm", spec=TeacherSpec(levels=[3, 4]), model="convnext_atto", model_kwargs=TINY_CONVNEXT)


def test_a_tag_whose_eval_transform_resizes_bilinear_is_resized_so():
    """167 of timm's tags (torchvision's ResNets, TF EfficientNet-Lite) were trained and are evaluated with a
    bilinear resize; the teacher resized every image bicubic (up to 0.49 apart on the astronaut)."""
    import torch.nn.functional as F

    bilinear = create_teacher("timm", spec=TeacherSpec(image_size=64), model="resnet18.tv_in1k")
    bicubic = create_teacher("timm", spec=TeacherSpec(image_size=64), model="resnet18.a1_in1k")
    assert bilinear.meta.extra["interpolation"] == "bilinear" and "interpolation" not in bicubic.meta.extra
    images = torch.randint(0, 256, (1, 3, 100, 80), dtype=torch.uint8)
    want = F.interpolate(images / 255.0, size=(64, 64), mode="bilinear", antialias=True).clamp(0, 1)
    mean, std = torch.tensor(bilinear.meta.mean)[:, None, None], torch.tensor(bilinear.meta.std)[:, None, None]
    torch.testing.assert_close(bilinear.preprocess(images), (want - mean) / std)


def test_models_whose_maps_do_not_follow_the_input_size_are_refused_when_built():
    """Unpadded convolutions (Inception) gave smaller maps than level_shapes() promised, which the cache stored
    as the manifest's shapes and then refused to read; a model built for one size (EfficientFormer) failed
    inside timm at the first batch."""
    with pytest.raises(ValueError, match=r"at 288 px its levels are \[\(192, 68, 68\).*not \[\(192, 72, 72\)"):
        create_teacher("timm", spec=TeacherSpec(image_size=288), model="inception_v3")
    with pytest.raises(ValueError, match=r"does not run at 256 px .* set teachers\[\]\.image_size to 224"):
        create_teacher("timm", spec=TeacherSpec(image_size=256), model="efficientformer_l1")
    assert create_teacher("timm", model="efficientformer_l1").level_shapes()[-1] == (448, 7, 7)


def test_the_shape_check_runs_on_the_meta_device_and_falls_back_to_the_model(monkeypatch):
    """The built model's maps are checked on a meta-device copy of its architecture (shapes only: seconds for
    a large CNN at 768 px); where the architecture cannot be built there, the real model runs the image."""
    from timm.models.convnext import ConvNeXt

    from sak.teachers.timm_teacher import TimmTeacher

    devices, real = [], ConvNeXt.forward_intermediates

    def recording(self, x, **kwargs):
        devices.append(x.device.type)
        return real(self, x, **kwargs)

    monkeypatch.setattr(ConvNeXt, "forward_intermediates", recording)
    kwargs = {k: list(v) for k, v in TINY_CONVNEXT.items()}
    teacher = create_teacher("timm", spec=TeacherSpec(image_size=64), model="convnext_atto", model_kwargs=kwargs)
    assert devices == ["meta"] and all(p.device.type == "cpu" for p in teacher.parameters())

    devices.clear()
    monkeypatch.setattr(TimmTeacher, "_probe", lambda *args: None)
    create_teacher("timm", spec=TeacherSpec(image_size=64), model="convnext_atto", model_kwargs=kwargs)
    assert devices == ["cpu"]


def test_a_model_without_feature_info_or_vit_blocks_is_a_clear_error():
    class Opaque(torch.nn.Module):
        def forward_intermediates(self, x, **kwargs):
            return x, [x]

    with pytest.raises(ValueError, match="Opaque has neither timm's feature_info nor ViT blocks"):
        feature_levels(Opaque(), "timm teacher opaque")


def test_a_cnn_teacher_distils_end_to_end_through_the_recipe(tiny_recipe):
    """The student sizes each teacher's aligners from level_dims: a CNN's differ per level (8, 16, 32, 64)."""
    from sak.engine import train

    kwargs = {k: list(v) for k, v in TINY_CONVNEXT.items()}
    cnn = {
        "name": "timm",
        "key": "cnn",
        "image_size": 64,
        "options": {"model": "convnext_atto", "model_kwargs": kwargs},
    }
    recipe = tiny_recipe(
        f"teachers.1={json.dumps(cnn)}", "schedule.max_steps=2", "data.num_workers=0", "eval.batches=1"
    )
    final = train(recipe)
    assert math.isfinite(final["val/cosine/cnn"])  # the student's maps and the CNN's targets lined up


def test_preprocess_clamps_bicubic_overshoot_as_timms_own_transform_saturates():
    """timm's eval transform resizes with PIL in 8 bits, which saturates at 0 / 255; float bicubic overshoots
    at sharp edges (astronaut: 0.30 normalised units more than timm's, 0.096 with the clamp)."""
    from PIL import Image
    from skimage.data import astronaut
    from timm.data import create_transform, resolve_data_config

    image = astronaut()
    teacher = create_teacher("timm", model="vit_small_patch14_dinov2", model_kwargs={**TINY, "img_size": 518})
    expected = create_transform(**resolve_data_config({}, model=teacher.model))(Image.fromarray(image))[None]
    ours = teacher.preprocess(torch.from_numpy(image).permute(2, 0, 1)[None])
    gap = (ours - expected).abs()
    assert ours.shape == expected.shape == (1, 3, 518, 518) and gap.max() < 0.12 and gap.mean() < 0.006, gap.max()


def test_a_vit_teacher_at_a_size_its_patches_do_not_tile_is_refused_when_built():
    """Not at the first forward with timm's assertion: at build time, naming the sizes that would work."""
    kwargs = {"embed_dim": 24, "depth": 1, "num_heads": 2, "img_size": 56}
    with pytest.raises(ValueError, match=r"image_size 60 is not a multiple of its patch size / stride 14.* 56 or 70"):
        create_teacher("timm", spec=TeacherSpec(image_size=60), model="vit_small_patch14_dinov2", model_kwargs=kwargs)
    with pytest.raises(ValueError, match=r"image_size 10 .* \(teachers\[\]\.image_size\) to 14$"):
        create_teacher("timm", spec=TeacherSpec(image_size=10), model="vit_small_patch14_dinov2", model_kwargs=kwargs)
    teacher = create_teacher(
        "timm", spec=TeacherSpec(image_size=70), model="vit_small_patch14_dinov2", model_kwargs=kwargs
    )
    assert teacher.level_shapes()[-1] == (24, 5, 5)


@pytest.mark.parametrize(
    "kwargs", [{}, {"class_token": False, "reg_tokens": 4, "global_pool": "avg"}], ids=["class token", "reg4 gap"]
)
def test_the_summary_is_the_image_feature_the_model_pools(kwargs):
    """A ViT without a class token (`*_reg4_gap_*`: registers, average pooling) gave its first register token
    as the summary; the model's own pooling gives its image feature, and the class token where it has one."""
    teacher = create_teacher("timm", model="vit_small_patch16_224", model_kwargs={**TINY, "img_size": 64, **kwargs})
    model, x = teacher.model, torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        expected = model.forward_head(tokens, pre_logits=True)
    summary = teacher(x).summary
    torch.testing.assert_close(summary, expected, atol=1e-5, rtol=0)
    if not kwargs:
        torch.testing.assert_close(summary, tokens[:, 0], atol=1e-5, rtol=0)
    else:
        assert (summary - tokens[:, 0]).abs().max() > 0.1  # not register 0


@pytest.mark.parametrize(
    ("name", "options", "tag", "model", "tags"),
    [
        ("timm", {"model": "vit_small_patch14_dinov2"}, "lvd999m", "vit_small_patch14_dinov2", "lvd142m"),
        ("clip", {"source": "timm"}, "laion5b", "vit_base_patch16_clip_384", "laion2b_ft_in12k_in1k"),
        ("sam", {"source": "timm"}, "sa1c", "samvit_base_patch16", "sa1b"),
    ],
)
def test_an_unknown_timm_tag_is_named_with_the_models_tags_not_as_a_failed_download(name, options, tag, model, tags):
    with pytest.raises(ValueError, match=rf"{tag!r} is not a pretrained tag of timm's {model}; its tags: .*{tags}"):
        create_teacher(name, tag, **options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model": "vit_smal_patch16_224"}, r"timm has no model 'vit_smal_patch16_224'; did you mean vit_small_patch16_224"),
        ({"model": "no_such_net"}, r"timm has no model 'no_such_net' \(see timm.list_models\(\)\)"),
        ({"model": "vit_small_patch16_224", "model_kwargs": {"depthh": 2}},
         r"model_kwargs \{'depthh': 2\} do not build the model: TypeError: .*'depthh'"),
        ({"model": "vit_small_patch16_224", "model_kwargs": {"embed_dim": 32, "num_heads": 5}},
         r"do not build the model: AssertionError: dim should be divisible by num_heads"),
    ],
)  # fmt: skip
def test_a_misspelt_model_or_model_kwargs_it_does_not_take_is_a_value_error(options, message):
    """They were timm's RuntimeError / TypeError / AssertionError, printed by `sak train` as tracebacks."""
    with pytest.raises(ValueError, match=rf"timm teacher .*{message}"):
        create_teacher("timm", None, **options)


def test_a_local_dir_model_name_is_left_to_timm(tmp_path):
    """`local-dir:` / `hf-hub:` names are timm's own ways to a model: the misspelling check refused them."""
    from sak.teachers.weights import check_timm_model

    folder = tmp_path / "vit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_small_patch16_224", "pretrained_cfg": {},
                                                    "model_args": {"embed_dim": 32, "depth": 1, "num_heads": 2}}))  # fmt: skip
    teacher = create_teacher("timm", None, model=f"local-dir:{folder}")
    assert teacher.meta.embed_dim == 32
    check_timm_model("hf-hub:timm/vit_small_patch16_224.augreg_in21k", "x")  # no download, no error


def test_a_local_file_under_a_name_whose_tags_disagree_must_name_its_tag(tmp_path):
    """vit_base_patch16_224's AugReg tags use mean / std 0.5, its DINO and MAE tags ImageNet's: under the bare
    name a file took the default tag's 0.5 whatever it held (the clip teacher already refused this)."""
    kwargs = {**TINY, "img_size": 64}
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **kwargs)
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    file = str(tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match=r"ambiguous.*vit_base_patch16_224.mae.*Name the tag of the weights"):
        create_teacher("timm", file, model="vit_base_patch16_224", model_kwargs=kwargs)
    assert create_teacher("timm", file, model="vit_base_patch16_224.mae", model_kwargs=kwargs).meta.mean == (
        0.485, 0.456, 0.406,
    )  # fmt: skip


def test_a_ddp_training_save_under_a_relative_pth_tar_path_loads(tmp_path, monkeypatch):
    """A DistributedDataParallel model's keys (`module.` before each) were "missing / unexpected" for every teacher
    but clip; `ckpts/model.pth.tar` (MoCo's and DeiT's naming), relative, was read as a hub name."""
    torch.manual_seed(0)
    full = timm.create_model("convnext_atto", pretrained=False, **TINY_CONVNEXT).eval()
    (tmp_path / "ckpts").mkdir()
    torch.save({"epoch": 9, "state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}},
               tmp_path / "ckpts" / "model.pth.tar")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    teacher = create_teacher("timm", "ckpts/model.pth.tar", spec=TeacherSpec(levels=[3], image_size=64),
                             model="convnext_atto", model_kwargs=TINY_CONVNEXT)  # fmt: skip
    x = torch.randn(1, 3, 64, 64)
    expected = full.forward_intermediates(x, indices=[3], intermediates_only=True)[0]
    torch.testing.assert_close(teacher(x).levels[0], expected, atol=1e-5, rtol=0)
    with pytest.raises(WeightsError, match="ckpts/missing.pth.tar"):  # (a local file, not a hub name)
        create_teacher("timm", "ckpts/missing.pth.tar", model="convnext_atto", model_kwargs=TINY_CONVNEXT)


@pytest.mark.parametrize("weights", ["ckpts/model.weights", "ckpts/dino/model.npz"])
def test_a_missing_file_with_another_suffix_is_said_missing_not_sent_to_timm_as_a_tag(weights, tmp_path, monkeypatch):
    """Read as a pretrained tag, `ckpts/model.weights` became timm's model name vit_small_patch14_dinov2.ckpts/...,
    which timm refused as "no source prefix but looks like a Hugging Face Hub repo id"; a timm tag has no '/'. The
    file is looked for before the model is built, and a sha256 beside it is not called a hub tag's."""
    monkeypatch.chdir(tmp_path)
    expected = rf"weights file '{weights}' does not exist \(from {tmp_path}\)"
    with pytest.raises(WeightsError, match=expected):
        create_teacher("timm", weights, model="vit_small_patch14_dinov2", model_kwargs=TINY)
    with pytest.raises(WeightsError, match=expected):
        create_teacher("timm", spec=TeacherSpec(weights=weights, sha256="0" * 64), model="vit_small_patch14_dinov2")


def test_a_weights_file_torch_cannot_read_says_what_it_is_not(tmp_path):
    """A text file given as weights was "cannot read ... with torch.load(weights_only=True): 105"."""
    from sak.teachers.weights import WeightsError, load_state_dict

    (tmp_path / "w.pth").write_text("id,name\n")
    with pytest.raises(WeightsError, match=r"w.pth' with torch.load\(weights_only=True\) \(\w+: .*\): not a file "
                       r"torch.save wrote, or a damaged one") as error:  # fmt: skip
        load_state_dict(tmp_path / "w.pth", "teacher")
    # torch's reason kept, not its advice to load with weights_only=False (which can run the file's code)
    assert "Unsupported operand 105" in str(error.value) and "False" not in str(error.value)
    import argparse

    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "ckpt.pth")  # (a training checkpoint)
    with pytest.raises(WeightsError, match=r"Unsupported global.*it holds objects other than tensors; save its state"):
        load_state_dict(tmp_path / "ckpt.pth", "teacher")
    # a file whose unpickling would call os.system: torch's reason (its module is blocked), not its advice to load
    # with weights_only=False, which was all that was left of its words
    import os

    class Call:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"w": Call()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError) as error:
        load_state_dict(tmp_path / "evil.pth", "teacher")
    assert "unsupported GLOBAL posix.system whose module posix is blocked" in str(error.value)
    assert "it would run code to load" in str(error.value) and "Re-running" not in str(error.value)
    assert not (tmp_path / "ran").exists()
