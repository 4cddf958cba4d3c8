"""The offline EfficientNet-Lite0 teacher: real ImageNet weights that classify real photographs."""

import pytest
import timm
import torch
from PIL import Image

from sak.teachers import create_teacher
from sak.teachers.efficientnet import efficientnet_lite0_classifier

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.mark.parametrize(("image", "classes"), [("chelsea", CATS), ("coffee", [ESPRESSO])])
def test_classifies_real_photographs(image, classes):
    import skimage.data

    model = efficientnet_lite0_classifier()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    x = transform(Image.fromarray(getattr(skimage.data, image)()))[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert probs.argmax().item() in classes
    assert probs[list(classes)].sum() > 0.5


def test_teacher_levels_strides_and_freezing():
    teacher = create_teacher("efficientnet_lite0")
    assert teacher.level_dims == (24, 40, 112, 320) and teacher.level_strides == (4, 8, 16, 32)
    assert teacher.level_shapes() == [(24, 56, 56), (40, 28, 28), (112, 14, 14), (320, 7, 7)]
    assert teacher.meta.mean == (0.5, 0.5, 0.5) and teacher.meta.sha256
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    out = teacher.encode(torch.randint(0, 255, (2, 3, 200, 300), dtype=torch.uint8))
    assert [t.shape[1:] for t in out.levels] == [(24, 56, 56), (40, 28, 28), (112, 14, 14), (320, 7, 7)]
    assert out.summary.shape == (2, 1280)
