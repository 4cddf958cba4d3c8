"""The CLIP teacher: open_clip and timm sources give each library's own features for the same weights."""

import json

import open_clip
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage.data import astronaut

from sak.teachers import TeacherSpec, create_teacher
from sak.teachers.base import CLIP_MEAN, CLIP_STD
from sak.teachers.clip import open_clip_tag_args
from sak.teachers.weights import WeightsError

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 4, "head_width": 16}
TEXT = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
OPEN_CLIP = {"embed_dim": 24, "vision_cfg": VISION, "text_cfg": TEXT}  # a tiny ViT-B-16 layout
TIMM = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}  # the same tower in timm


def randomise(module: torch.nn.Module) -> None:
    """Every parameter random (norm scales around 1), so that no code path sees its zero / unit init."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2)


@pytest.fixture(scope="module")
def clip_model():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", **OPEN_CLIP).eval()
    randomise(model)
    return model


@pytest.fixture(scope="module")
def clip_file(clip_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "open_clip_pytorch_model.bin"  # the hub's file: a plain state dict
    torch.save(clip_model.state_dict(), path)
    return path


def open_clip_teacher(weights, **spec):
    return create_teacher(
        "clip", str(weights), spec=TeacherSpec(**spec), source="open_clip", model="ViT-B-16", model_kwargs=OPEN_CLIP
    )


def test_open_clip_file_gives_open_clips_intermediates_and_image_embedding(clip_model, clip_file):
    teacher = open_clip_teacher(clip_file)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = clip_model.visual.forward_intermediates(x, indices=[0, 1, 2, 3], output_fmt="NCHW")
        embedding = clip_model.encode_image(x)
    out = teacher(x)
    assert teacher.meta.levels == (0, 1, 2, 3) and [t.shape for t in out.levels] == [(2, 32, 4, 4)] * 4
    for a, b in zip(out.levels, ref["image_intermediates"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.summary, embedding, atol=1e-5, rtol=0)
    assert out.levels[-1].std() > 0.1 and teacher.meta.sha256 and teacher.meta.mean == CLIP_MEAN


def test_half_precision_open_clip_files_load_at_another_size_as_float32(clip_model, tmp_path):
    """OpenAI-derived open_clip files are fp16: resampling their position embedding to another image_size raised
    "compute_index_ranges_weights" not implemented for 'Half' (the antialiased bicubic has no CPU kernel). Loaded
    as float32, they give what the same rounded weights saved in float32 give, exactly."""
    x = torch.randn(1, 3, 48, 48)
    for dtype in (torch.float16, torch.bfloat16):
        rounded = {k: v.to(dtype) if v.is_floating_point() else v for k, v in clip_model.state_dict().items()}
        torch.save(rounded, tmp_path / "half.bin")
        torch.save({k: v.float() if v.is_floating_point() else v for k, v in rounded.items()}, tmp_path / "full.bin")
        teacher = open_clip_teacher(tmp_path / "half.bin", image_size=48)
        assert next(teacher.parameters()).dtype == torch.float32
        reference = open_clip_teacher(tmp_path / "full.bin", image_size=48)
        torch.testing.assert_close(teacher(x).levels[-1], reference(x).levels[-1], atol=0, rtol=0)


def test_open_clip_training_checkpoint_with_ddp_prefix_loads(clip_model, clip_file, tmp_path):
    state = {f"module.{k}": v for k, v in clip_model.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": state}, tmp_path / "epoch_3.pt")  # open_clip's training save
    x = torch.randn(1, 3, 32, 32)
    a, b = open_clip_teacher(tmp_path / "epoch_3.pt")(x), open_clip_teacher(clip_file)(x)
    torch.testing.assert_close(a.levels[-1], b.levels[-1], atol=0, rtol=0)


def test_open_clip_directory_loads_through_open_clips_local_dir_schema(clip_model, tmp_path):
    cfg = {"model_cfg": OPEN_CLIP, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}  # SigLIP-like
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.save(clip_model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    teacher = create_teacher("clip", str(tmp_path), source="open_clip")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = clip_model.visual.forward_intermediates(x, indices=[0, 1, 2, 3])["image_intermediates"]
    torch.testing.assert_close(teacher(x).levels[2], ref[2], atol=1e-5, rtol=0)
    assert teacher.meta.mean == (0.5,) * 3 and teacher.meta.std == (0.25,) * 3  # the directory's own normalisation
    # what was loaded, not the ignored `model` option, and a digest that follows the directory's weights (the
    # metadata, and with it a feature cache's identity, stayed the same when they changed)
    assert teacher.meta.name == f"local-dir:{tmp_path}" and len(teacher.meta.sha256) == 64
    state = clip_model.state_dict()
    torch.save(
        {k: v + 1 if k == "visual.proj" else v for k, v in state.items()}, tmp_path / "open_clip_pytorch_model.bin"
    )
    again = create_teacher("clip", str(tmp_path), source="open_clip", model="ViT-L-14")
    assert again.meta.name == teacher.meta.name and again.meta.sha256 != teacher.meta.sha256
    # damaged, or a file whose unpickling would run code: named with the folder (a raw UnpicklingError advising
    # weights_only=False before)
    data = (tmp_path / "open_clip_pytorch_model.bin").read_bytes()
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        WeightsError,
        match=rf"open_clip cannot load the weights of '{tmp_path}' \(RuntimeError: "
        r"PytorchStreamReader failed reading zip archive: failed finding central directory\): a "
        r"damaged file",
    ):  # (not "looked in the Hugging Face cache")
        create_teacher("clip", str(tmp_path), source="open_clip", model="ViT-B-16")
    import os

    class Call:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"w": Call()}, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"cannot read the weights of .*is blocked\.\): it would run code to load"):
        create_teacher("clip", str(tmp_path), source="open_clip", model="ViT-B-16")
    assert not (tmp_path / "ran").exists()


def test_sequence_first_transformer_gives_the_same_levels(clip_file):
    """open_clip before 2.24 (and towers built with batch_first=False) run the blocks on (L, B, C)."""
    teacher = open_clip_teacher(clip_file)
    x = torch.randn(2, 3, 32, 32)
    batch_first = teacher(x)
    transformer = teacher.tower.visual.transformer
    transformer.batch_first = False
    for block in transformer.resblocks:
        block.attn.batch_first = False
    seq_first = teacher(x)
    for a, b in zip(seq_first.levels, batch_first.levels, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(seq_first.summary, batch_first.summary, atol=1e-5, rtol=0)


def test_timm_safetensors_give_timms_own_intermediates(tmp_path):
    torch.manual_seed(1)
    ref = timm.create_model("vit_base_patch16_clip_384", pretrained=False, num_classes=0, **TIMM).eval()
    randomise(ref)
    save_file(ref.state_dict(), str(tmp_path / "model.safetensors"))
    teacher = create_teacher("clip", str(tmp_path / "model.safetensors"), model_kwargs=TIMM)  # source timm by default
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, expected = ref.forward_intermediates(x, indices=[0, 1, 2, 3], norm=False)
        cls = ref.forward_head(final, pre_logits=True)
    out = teacher(x)
    for a, b in zip(out.levels, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.summary, cls, atol=1e-5, rtol=0)
    assert teacher.meta.source == "timm" and teacher.meta.name == "vit_base_patch16_clip_384"


def test_weights_trained_with_quick_gelu_run_by_timm_with_gelu_are_said(clip_file, caplog):
    """timm notes "natively QuickGELU" in the tag and builds GELU from the name (OpenAI's, DFN's, MetaCLIP's):
    kept, as the official code runs them so too, but it was silent."""
    with caplog.at_level("WARNING", logger="sak.teachers.clip"):
        create_teacher("clip", str(clip_file), model="vit_base_patch16_clip_224.openai", model_kwargs=TIMM)
    assert (
        "trained with QuickGELU" in caplog.text and "name the model vit_base_patch16_clip_quickgelu_224" in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="sak.teachers.clip"):
        quick = create_teacher("clip", str(clip_file), model="vit_base_patch16_clip_quickgelu_224.openai",
                               model_kwargs=TIMM)  # fmt: skip
        create_teacher("clip", str(clip_file), model="vit_base_patch16_clip_224.openai_ft_in1k", model_kwargs=TIMM)
        # an untagged name's configuration is its default tag's (vit_huge_patch14_clip_378: dfn5b), which the
        # file need not hold: nothing is said
        create_teacher("clip", str(clip_file), model="vit_huge_patch14_clip_378", model_kwargs=TIMM)
    assert "QuickGELU" not in caplog.text and type(quick.tower.model.blocks[0].mlp.act).__name__ == "QuickGELU"


@pytest.mark.parametrize("size", [None, 48])
def test_same_open_clip_weights_through_timm_give_the_same_features(clip_model, clip_file, size):
    """timm converts the open_clip checkpoint itself; at 48 px both resample position embeddings on load."""
    via_open_clip = open_clip_teacher(clip_file, image_size=size)
    via_timm = create_teacher(
        "clip", str(clip_file), spec=TeacherSpec(image_size=size), model="vit_base_patch16_clip_224", model_kwargs=TIMM
    )
    s = size or 32
    x = torch.randn(2, 3, s, s)
    a, b = via_open_clip(x), via_timm(x)
    for la, lb in zip(a.levels, b.levels, strict=True):
        assert la.shape == (2, 32, s // 8, s // 8)
        torch.testing.assert_close(la, lb, atol=1e-4, rtol=0)
    # timm's summary is the class token before CLIP's projection, open_clip's the projected embedding
    torch.testing.assert_close(b.summary @ clip_model.visual.proj, a.summary, atol=1e-4, rtol=0)
    assert via_open_clip.meta.native_size == via_timm.meta.native_size == 32


def test_a_file_of_another_patch_size_is_refused_through_timm_as_through_open_clip(clip_file):
    """timm's checkpoint filter resampled the patch kernel to the model's without a word: a patch-8 file loaded
    into a patch-16 model as a network nobody trained."""
    with pytest.raises(WeightsError, match=r"patch embedding of shape \(32, 3, 8, 8\), the model .* \(32, 3, 16, 16\)"):
        create_teacher(
            "clip", str(clip_file), model="vit_base_patch16_clip_224", model_kwargs={**TIMM, "patch_size": 16}
        )


def test_an_open_clip_timm_tower_of_another_patch_size_is_refused(tmp_path):
    """open_clip's SigLIP-style towers are timm models under `visual.trunk.`: their patch kernel was not looked
    at, and timm's filter (which strips the prefix) resampled it."""
    import timm
    from safetensors.torch import save_file

    tower = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, num_classes=0, **TIMM)
    save_file({f"visual.trunk.{k}": v for k, v in tower.state_dict().items()}, str(tmp_path / "siglip.safetensors"))
    with pytest.raises(WeightsError, match=r"patch embedding of shape \(32, 3, 8, 8\), the model .* \(32, 3, 16, 16\)"):
        create_teacher("clip", str(tmp_path / "siglip.safetensors"), source="timm",
                       model="vit_base_patch16_siglip_224", model_kwargs={**TIMM, "patch_size": 16})  # fmt: skip


def test_a_training_checkpoint_of_another_patch_size_is_refused_through_timm_too(clip_model, tmp_path):
    """Its `module.`-prefixed keys (open_clip's DDP training save) hid the patch kernel from the check."""
    state = {f"module.{k}": v for k, v in clip_model.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "epoch_3.pt")
    with pytest.raises(WeightsError, match=r"patch embedding of shape \(32, 3, 8, 8\), the model .* \(32, 3, 16, 16\)"):
        create_teacher(
            "clip", str(tmp_path / "epoch_3.pt"), model="vit_base_patch16_clip_224",
            model_kwargs={**TIMM, "patch_size": 16},
        )  # fmt: skip
    teacher = create_teacher("clip", str(tmp_path / "epoch_3.pt"), model="vit_base_patch16_clip_224", model_kwargs=TIMM)
    assert teacher.meta.patch_size == 8  # the same file into the model it was saved from


def test_preprocess_leaves_the_callers_images_alone(clip_file):
    """The clamp after resampling wrote into the caller's float images when resize and crop changed nothing
    (and failed on inference-mode or grad-requiring inputs)."""
    teacher = open_clip_teacher(clip_file)
    images = torch.linspace(-0.5, 1.5, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    before = images.clone()
    teacher.preprocess(images)
    assert torch.equal(images, before)
    with torch.inference_mode():
        frozen = before.clone()
    teacher.encode(frozen)  # an inference tensor, used outside inference mode
    teacher.preprocess(before.clone().requires_grad_(True))


def test_a_local_file_through_timm_takes_the_mean_and_std_of_its_tag(clip_file):
    """A file says nothing about its normalisation; timm reads it from the model name's tag. LAION's ViT-L/14 was
    trained with mean = std = 0.5, OpenAI's with CLIP's constants, so an untagged ViT-L/14 name is ambiguous."""

    def timm_teacher(model):
        return create_teacher("clip", str(clip_file), model=model, model_kwargs=TIMM)

    with pytest.raises(WeightsError, match=r"untagged model name is ambiguous.*0\.5.*laion2b_ft_in1k.*\.openai"):
        timm_teacher("vit_large_patch14_clip_336")
    openai, laion = (
        timm_teacher("vit_large_patch14_clip_336.openai"),
        timm_teacher("vit_large_patch14_clip_224.laion2b"),
    )
    assert (openai.meta.mean, openai.meta.std) == (CLIP_MEAN, CLIP_STD)
    assert (laion.meta.mean, laion.meta.std) == ((0.5,) * 3, (0.5,) * 3)
    assert timm_teacher("vit_base_patch16_clip_224").meta.mean == CLIP_MEAN  # all its tags agree
    with pytest.raises(RuntimeError, match="Invalid pretrained tag"):  # not reported as a download failure
        timm_teacher("vit_base_patch16_clip_224.laion5b")


def astronaut_batch(width: int) -> tuple[torch.Tensor, Image.Image]:
    image = astronaut()[:, :width]  # (512, width, 3) uint8
    return torch.from_numpy(image).permute(2, 0, 1)[None], Image.fromarray(image)


def open_clip_transform(size: int):
    return open_clip.image_transform(size, is_train=False, mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic")


def test_center_crop_preprocess_matches_open_clips_transform(clip_file):
    """open_clip: shortest side to 224 with PIL bicubic, centre crop. Tensor and PIL resampling differ a little:
    measured 0.038 max / 0.0041 mean in normalised units here."""
    teacher = open_clip_teacher(clip_file, image_size=224)
    teacher.options.center_crop = True
    batch, pil = astronaut_batch(384)  # not square: the crop matters
    ours, theirs = teacher.preprocess(batch)[0], open_clip_transform(224)(pil)
    assert ours.shape == theirs.shape == (3, 224, 224)
    diff = (ours - theirs).abs()
    assert diff.max() < 0.06 and diff.mean() < 0.005, (diff.max(), diff.mean())
    assert (ours.mean((1, 2)) - theirs.mean((1, 2))).abs().max() < 2e-3


def test_center_crop_is_refused_for_images_that_are_not_square(clip_file, tmp_path):
    """The crop sees the centre of a 448 x 576 NYUD image and its map was stretched over the whole image (the
    loss aligns maps by resizing), each token against the wrong place: refused before training or a cache build."""
    import types

    from sak.engine.fit import check_samples_fit

    teacher = open_clip_teacher(clip_file, image_size=224)
    teacher.options.center_crop = True
    teacher.check_image_size((384, 384))
    with pytest.raises(ValueError, match=r"center_crop keeps the centre square of the 448 x 576 images"):
        teacher.check_image_size((448, 576))
    student = torch.nn.Linear(1, 1)  # (no patch size: check_canvas has nothing to say of it)
    nyud_val = types.SimpleNamespace(eval_size=(448, 576), spec=types.SimpleNamespace(train=False))
    with pytest.raises(ValueError, match=r"448 x 576 images"):
        check_samples_fit(student, nyud_val, {"clip": teacher})
    teacher.options.center_crop = False
    check_samples_fit(student, nyud_val, {"clip": teacher})


def test_default_preprocess_squashes_the_whole_image_as_open_clips_squash_mode(clip_file):
    """No crop by default: on a square image this is open_clip's own transform; on any image its `squash` mode."""
    teacher = open_clip_teacher(clip_file, image_size=224)
    for width in (512, 384):
        batch, pil = astronaut_batch(width)
        squash = open_clip.image_transform(
            224, is_train=False, mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic", resize_mode="squash"
        )
        diff = (teacher.preprocess(batch)[0] - squash(pil)).abs()  # measured 0.071 max, 0.0037 mean (512)
        assert diff.max() < 0.08 and diff.mean() < 0.005, (width, diff.max(), diff.mean())
    diff = (teacher.preprocess(astronaut_batch(512)[0])[0] - open_clip_transform(224)(astronaut_batch(512)[1])).abs()
    assert diff.max() < 0.08 and diff.mean() < 0.005


def test_frozen_and_eval_forever(clip_file):
    teacher = open_clip_teacher(clip_file)
    teacher.train()
    assert not any(m.training for m in teacher.modules()) and not any(p.requires_grad for p in teacher.parameters())
    out = teacher.encode(torch.randint(0, 255, (1, 3, 40, 50), dtype=torch.uint8))
    assert out.levels[0].shape == (1, 32, 4, 4) and out.summary.shape == (1, 24) and not out.summary.requires_grad


def test_openai_tags_get_quick_gelu_and_unknown_names_list_the_choices():
    assert open_clip_tag_args("ViT-B-16", "openai") == {"pretrained": "openai", "force_quick_gelu": True}
    assert open_clip_tag_args("ViT-B-16", "laion2b_s34b_b88k")["force_quick_gelu"] is False
    with pytest.raises(ValueError, match="tags: openai, laion400m_e31"):
        create_teacher("clip", "laion5b", source="open_clip", model="ViT-B-16")
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-B-61'.*ViT-B-16"):
        create_teacher("clip", source="open_clip", model="ViT-B-61")
    # an open_clip name under the default source, timm: was timm's "Unknown model" traceback
    with pytest.raises(ValueError, match=r"timm has no model 'ViT-B-16' .*'ViT-B-16' is an open_clip model: set `s"):
        create_teacher("clip", model="ViT-B-16")
    with pytest.raises(ValueError, match=r"timm has no model 'vit_base_patch16_clip_38'; did you mean vit_base_patc"):
        create_teacher("clip", model="vit_base_patch16_clip_38")
    with pytest.raises(ValueError, match="levels \\[0, 9\\] must be block indices in 0..3"):
        create_teacher("clip", spec=TeacherSpec(levels=[0, 9]), model_kwargs=TIMM)


def test_missing_files_wrong_checkpoints_and_offline_tags_are_clear_errors(clip_file, monkeypatch, tmp_path):
    with pytest.raises(WeightsError, match="nope.bin' does not exist"):
        open_clip_teacher(tmp_path / "nope.bin")
    three_blocks = {**OPEN_CLIP, "vision_cfg": {**VISION, "layers": 3}}
    with pytest.raises(WeightsError, match="does not fit the model .*12 unexpected, e.g. \\['transformer.resblocks.3"):
        create_teacher("clip", str(clip_file), source="open_clip", model_kwargs=three_blocks)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    # model_kwargs that build no model, with or without a hub tag (timm builds before it downloads): named as such,
    # not as a failed download, nor as timm's bare RuntimeError / AssertionError
    for weights in (None, "hub"):
        for bad, error in (({"mlp_ratio": -1.0}, "RuntimeError"), ({"embed_dim": 30, "num_heads": 4}, "Assertion")):
            with pytest.raises(ValueError, match=f"model_kwargs .* do not build the model: {error}"):
                create_teacher("clip", weights, model_kwargs={**TIMM, **bad})
    with pytest.raises(WeightsError, match="could not create 'vit_base_patch16_clip_384' with pretrained weights"):
        create_teacher("clip", "hub", model_kwargs=TIMM)
    # the advice for a file names the model with OpenAI's QuickGELU (a file carries none: `ViT-B-16` ran GELU)
    with pytest.raises(WeightsError, match=r"Hugging Face cache.*huggingface.co/timm/vit_base_patch16_clip_224.openai, "
                                           r"pass its path as `weights` and set `model: ViT-B-16-quickgelu`"):  # fmt: skip
        create_teacher("clip", "openai", source="open_clip", model="ViT-B-16", model_kwargs=OPEN_CLIP)
    # and, where the tag's mean / std are not those a file would get (LAION's ViT-L/14: 0.5), a folder
    with pytest.raises(WeightsError, match=r"CLIP-ViT-L-14-laion2B-s32B-b82K \(open_clip_config.json beside the "
                                           r"weights\) into a folder .* not the tag's \(0.5, 0.5, 0.5\)"):  # fmt: skip
        create_teacher("clip", "laion2b_s32b_b82k", source="open_clip", model="ViT-L-14", model_kwargs=OPEN_CLIP)
    with pytest.raises(WeightsError, match=r"B-16-laion2B-s34B-b88K and pass its path as `weights` \(keep `model: ViT"):
        create_teacher("clip", "laion2b_s34b_b88k", source="open_clip", model="ViT-B-16", model_kwargs=OPEN_CLIP)
    with pytest.raises(WeightsError, match="Hugging Face cache.*pass a local file"):
        create_teacher("clip", "openai", model="vit_base_patch16_clip_224", model_kwargs=TIMM)
    # random weights, but a transformers text tower whose config comes from the hub (was "could not load None")
    with pytest.raises(WeightsError, match=r"(?s)could not load roberta-ViT-B-32 with random weights .* Offline, have "
                                           r"'roberta-base' in that cache: the text tower is"):  # fmt: skip
        create_teacher("clip", source="open_clip", model="roberta-ViT-B-32")


class _RunsCode:
    """A pickle that, unpickled without weights_only, writes a file: what a recipe must never make happen."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_model_kwargs_that_would_load_weights_by_open_clips_own_route_are_refused(tmp_path):
    """open_clip's create_model takes `pretrained=<file>, weights_only=False`: through model_kwargs a recipe (or
    `sak teachers show`, `sak select --option`) would unpickle any file, running code no plug-in names."""
    evil, marker = tmp_path / "evil.pt", tmp_path / "code_ran"
    torch.save({"x": _RunsCode(marker)}, evil)
    kwargs = {"pretrained": str(evil), "weights_only": False}
    with pytest.raises(ValueError, match=r"teacher 'clip': options.model_kwargs: pretrained, weights_only load "):
        create_teacher("clip", source="open_clip", model="ViT-B-16", model_kwargs=kwargs)
    assert not marker.exists()
