"""Distillation losses against values computed by hand on small fixed tensors."""

import math

import pytest
import torch

from sak.losses import MSEDistill, SAKDistill, TokenCosineDistill, match_size


def maps():
    s = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # (1, 1, 2, 2)
    t = torch.tensor([[[[1.0, 1.0], [0.0, 3.0]]]])
    return s, t


def test_sak_loss_is_09_cosine_plus_01_smoothl1():
    s, t = maps()
    cos = (1 * 1 + 1 * 3) / (math.sqrt(2) * math.sqrt(11))
    smooth = (0 + 0.5 * 1**2 + 0 + (2 - 0.5)) / 4  # |d| = 0, 1, 0, 2 with beta 1
    expected = 0.9 * (1 - cos) + 0.1 * smooth
    assert SAKDistill()([s], [t]).item() == pytest.approx(expected, rel=1e-6)
    assert SAKDistill()([s, s], [t, t]).item() == pytest.approx(2 * expected, rel=1e-6)  # summed over levels


def test_token_cosine_is_per_pixel():
    s = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2): pixel 0 = (1, 0), pixel 1 = (0, 1)
    t = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]]])  # pixel 0 = (1, 0), pixel 1 = (1, 1)
    cos = (1.0 + 1 / math.sqrt(2)) / 2
    loss = TokenCosineDistill(cos_weight=1.0, l1_weight=0.0)([s], [t])
    assert loss.item() == pytest.approx(1 - cos, rel=1e-6)


def test_mse():
    s, t = maps()
    assert MSEDistill()([s], [t]).item() == pytest.approx((0 + 1 + 0 + 4) / 4)


def test_the_smaller_map_is_resized_to_the_larger():
    small, big = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 4, 4)
    a, b = match_size(small, big)
    assert a.shape == b.shape == (1, 3, 4, 4) and b is big
    a, b = match_size(big, small)
    assert a is big and b.shape == (1, 3, 4, 4)


def test_level_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="student gives 1 levels, teacher 2"):
        SAKDistill()([torch.zeros(1, 1, 2, 2)], [torch.zeros(1, 1, 2, 2)] * 2)
