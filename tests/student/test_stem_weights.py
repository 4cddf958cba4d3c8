"""The student's stem from its recipe keys: the timm model name, its model_kwargs, and `student.pretrained` (a local
file or a hub tag), each mistake named by its key."""

import pytest
import torch

from sak.student import TeacherAgnosticStem
from sak.teachers.weights import WeightsError


def test_a_local_pretrained_file_that_loads_nothing_is_an_error(tmp_path):
    """A sak-checkpoint (`stem.vit.`) state dict would load no weight with strict=False; the stem refuses it
    instead of training from random weights (a DDP save's `module.` prefix is dropped, and it loads)."""
    from safetensors.torch import save_file

    kwargs = {"embed_dim": 16, "depth": 2, "num_heads": 2}
    vit = TeacherAgnosticStem("vit_small_patch16_224", 32, **kwargs).vit
    plain = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(plain, str(tmp_path / "plain.safetensors"))
    tagged = "vit_small_patch16_224.augreg_in21k"  # (a file's mean / std are its tag's)
    loaded = TeacherAgnosticStem(tagged, 32, str(tmp_path / "plain.safetensors"), **kwargs)
    assert torch.equal(loaded.vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    save_file({f"stem.vit.{k}": v for k, v in plain.items()}, str(tmp_path / "sak.safetensors"))
    with pytest.raises(ValueError, match=r"sak.safetensors.*not the state dict of a timm.*checkpoint.init_from"):
        TeacherAgnosticStem(tagged, 32, str(tmp_path / "sak.safetensors"), **kwargs)
    # a DDP save's `module.` before every key is dropped (sak.teachers.weights.load_state_dict), as for teachers
    save_file({f"module.{k}": v for k, v in plain.items()}, str(tmp_path / "ddp.safetensors"))
    ddp = TeacherAgnosticStem(tagged, 32, str(tmp_path / "ddp.safetensors"), **kwargs)
    assert torch.equal(ddp.vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    # another patch size: timm's filter resampled the kernel into a patch-16 network nobody trained
    with pytest.raises(WeightsError, match=r"plain.safetensors.*patch embedding is \(16, 3, 16, 16\).*\(16, 3, 8, 8\)"):
        TeacherAgnosticStem("vit_small_patch8_224", 32, str(tmp_path / "plain.safetensors"), **kwargs)


def test_a_missing_pretrained_file_with_another_suffix_is_said_missing(tmp_path, monkeypatch):
    """`student.pretrained: ckpts/model.weights` was sent to timm as a tag (the model vit_...ckpts/model.weights)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError, match=rf"'ckpts/model.weights' does not exist \(from {tmp_path}\)"):
        TeacherAgnosticStem("vit_small_patch16_224", 32, "ckpts/model.weights", embed_dim=16, depth=2, num_heads=2)


def test_a_local_pretrained_file_under_a_name_whose_tags_disagree_must_name_its_tag(tmp_path):
    """vit_small_patch16_224's AugReg tags use mean / std 0.5, its DINO tag ImageNet's: under the bare name a
    file took the default tag's 0.5 whatever it held. With student.normalization imagenet nothing is guessed."""
    from safetensors.torch import save_file

    kwargs = {"embed_dim": 16, "depth": 2, "num_heads": 2}
    vit = TeacherAgnosticStem("vit_small_patch16_224", 32, **kwargs).vit
    file = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, file)
    with pytest.raises(WeightsError, match=r"ambiguous.*vit_small_patch16_224.dino.*Name the tag of the weights"):
        TeacherAgnosticStem("vit_small_patch16_224", 32, file, **kwargs)
    assert TeacherAgnosticStem("vit_small_patch16_224.dino", 32, file, **kwargs).mean == (0.485, 0.456, 0.406)
    assert TeacherAgnosticStem("vit_small_patch16_224", 32, file, "imagenet", **kwargs).std == (0.229, 0.224, 0.225)


def test_a_misspelt_student_model_or_model_kwargs_it_does_not_take_is_a_value_error():
    """They were timm's RuntimeError / TypeError / AssertionError, printed by `sak train` as tracebacks."""
    with pytest.raises(ValueError, match=r"student.model: timm has no model 'vit_tiny_patch16_24'; did you mean "):
        TeacherAgnosticStem("vit_tiny_patch16_24", 64)
    with pytest.raises(ValueError, match=r"student vit_tiny_patch16_224 \(img_size=64 from data.image_size\): "
                       r"model_kwargs \{'depthh': 1\} do not build the model: TypeError"):  # fmt: skip
        TeacherAgnosticStem("vit_tiny_patch16_224", 64, depthh=1)


def test_a_hub_tag_for_the_student_offline_names_the_key_and_the_way_out(monkeypatch, tmp_path):
    """Not huggingface_hub's bare LocalEntryNotFoundError (recipes/baselines/mt_baseline.yaml offline)."""
    from sak.teachers.weights import WeightsError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match=r"student.pretrained 'augreg_in21k'.*Offline, pass a local file"):
        TeacherAgnosticStem("vit_tiny_patch16_224", 64, "augreg_in21k")
    # a tag timm does not know is named as such, not as a download problem
    with pytest.raises(ValueError, match=r"'augreg_in21' is not a pretrained tag of timm's vit_tiny_patch16_224; its "
                       r"tags: augreg_in21k, augreg_in21k_ft_in1k"):  # fmt: skip
        TeacherAgnosticStem("vit_tiny_patch16_224", 64, "augreg_in21")
