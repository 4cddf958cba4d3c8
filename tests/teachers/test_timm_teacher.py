"""The generic timm teacher: levels as timm computes them, frozen, any input size, local weights."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from sak.teachers import TeacherSpec, create_teacher
from sak.teachers.timm_teacher import default_levels
from sak.teachers.weights import WeightsError

TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2, "img_size": 56}


def test_default_levels_follow_sak():
    assert (
        default_levels(12) == [2, 5, 8, 11]
        and default_levels(24) == [5, 11, 17, 23]
        and default_levels(4) == [0, 1, 2, 3]
    )


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
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
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
