"""Each task draws its prediction in colour (Task.visualize, which `sak viz preds` uses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sak.tasks import create_task
from sak.tasks.base import Task, label_palette


def test_the_label_palette_is_pascal_voc_s_colour_map():
    palette = label_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert palette[15].tolist() == [192, 128, 128] and palette[255].tolist() == [224, 224, 192]  # person; ignore
    assert len({tuple(c) for c in palette}) == 256  # every label its own colour


@pytest.mark.parametrize("name", ["semseg", "parts"])
def test_segmentation_is_drawn_in_the_palette(name):
    labels = torch.tensor([[0, 1], [2, 15]])
    rgb = create_task(name).visualize(labels)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert (rgb == label_palette()[labels.numpy()]).all()


@pytest.mark.parametrize("name", ["saliency", "edges"])
def test_probabilities_are_grey_on_a_fixed_scale_not_stretched(name):
    """A faint map stays faint: 0.5 is mid-grey whatever else the map holds."""
    p = torch.tensor([[[0.0, 0.25], [0.5, 1.0]]])
    rgb = create_task(name).visualize(p)
    assert rgb.shape == (2, 2, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb[..., 0].tolist() == [[0, 64], [128, 255]]
    assert create_task(name).visualize(p * 0.5)[1, 1, 0] == 128


def test_normals_are_drawn_as_their_stored_colours():
    n = torch.tensor([0.0, 0.0, 1.0])[:, None, None].expand(3, 2, 3)
    rgb = create_task("normals").visualize(n)
    assert rgb.shape == (2, 3, 3) and (rgb == np.array([128, 128, 255], np.uint8)).all()


def test_depth_is_bright_near_dark_far_and_black_without_depth():
    d = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 0.0]]])
    rgb = create_task("depth").visualize(d).astype(int)
    brightness = rgb[0].sum(-1)
    assert brightness[0] > brightness[1] > brightness[2] > brightness[3] > 0  # nearer is brighter
    assert rgb[0, 4].tolist() == [0, 0, 0]  # no depth
    # the scale is the picture's own: twice as far everywhere draws the same picture
    assert (create_task("depth").visualize(d * 2) == rgb).all()


class _Plugin(Task):
    name = "plugin"


def test_a_plug_in_task_gets_a_default_drawing_and_a_clear_error_for_other_shapes():
    task = _Plugin()
    assert (task.visualize(torch.tensor([[0, 1]])) == label_palette()[[[0, 1]]]).all()
    one = task.visualize(torch.linspace(5, 9, 50).reshape(1, 5, 10))  # stretched: its own 2-98% range
    assert one.shape == (5, 10, 3) and one[0, 0].tolist() == [0, 0, 0] and one[-1, -1].tolist() == [255, 255, 255]
    assert task.visualize(torch.zeros(3, 2, 2)).shape == (2, 2, 3)  # a constant map: black, not NaN
    with pytest.raises(ValueError, match=r"plugin: cannot draw a prediction of shape \(4, 2, 2\).*Task.visualize"):
        task.visualize(torch.zeros(4, 2, 2))
