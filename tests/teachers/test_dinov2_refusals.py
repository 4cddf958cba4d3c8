"""Weights the DINOv2 teacher refuses, naming the file: another patch size (which timm's converter resampled), a
damaged or unsafe file in a transformers folder."""

import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from sak.teachers import create_teacher
from sak.teachers.weights import WeightsError

from .test_dinov2 import TIMM_TINY, hf_reference


def test_a_damaged_or_unsafe_file_in_a_transformers_folder_is_named(tmp_path):
    """transformers' own SafetensorError / UnpicklingError (its advice to load with weights_only=False) came out raw."""
    folder = tmp_path / "hf"
    hf_reference().save_pretrained(folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(WeightsError, match=rf"transformers cannot read the weights in '{folder}' \(SafetensorError: "
                       r".*\): a damaged safetensors file"):  # fmt: skip
        create_teacher("dinov2", str(folder))

    class Call:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    (folder / "model.safetensors").unlink()
    torch.save({"w": Call()}, folder / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"\(UnpicklingError: .*is blocked\.\): it would run code to load"):
        create_teacher("dinov2", str(folder))
    assert not (tmp_path / "ran").exists()


def test_a_file_of_another_patch_size_is_refused_not_resampled(tmp_path):
    """timm's checkpoint filter resampled a patch-16 kernel (a DINOv2-trained ViT-L/16, UNI's) to 14 without a
    word, in timm's layout and in Meta's: a network nobody trained."""
    other = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, init_values=1e-5,
                              **{**TIMM_TINY, "img_size": 64})  # fmt: skip
    save_file(other.state_dict(), str(tmp_path / "uni_like.safetensors"))
    refused = (
        r"patch embedding of shape \(32, 3, 16, 16\), the model one of \(32, 3, 14, 14\).*DINOv2's ViTs have patch 14"
    )
    with pytest.raises(WeightsError, match=refused):
        create_teacher("dinov2", str(tmp_path / "uni_like.safetensors"), model_kwargs=TIMM_TINY)
    meta = dict(other.state_dict())
    meta["mask_token"] = torch.zeros(1, 32)  # (Meta's layout: its unused mask token)
    torch.save(meta, tmp_path / "dinov2_vitb16_pretrain.pth")
    for source in ("meta", "timm"):
        with pytest.raises(WeightsError, match=refused):
            create_teacher("dinov2", str(tmp_path / "dinov2_vitb16_pretrain.pth"), source=source,
                           model_kwargs=TIMM_TINY)  # fmt: skip
