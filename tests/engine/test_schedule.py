import math

import pytest

from sak.engine.schedule import lr_lambda


def test_warmup_is_linear_then_cosine_reaches_the_floor():
    f = lr_lambda("cosine", total=10, warmup=2, base_lr=1e-3, min_lr=1e-5)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(10) == pytest.approx(0.01)


def test_poly_decays_with_power_to_zero():
    f = lr_lambda("poly", total=100, warmup=0, base_lr=2e-5, power=0.9)
    assert f(0) == 1.0
    assert f(50) == pytest.approx(0.5**0.9)
    assert f(100) == 0.0


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        lr_lambda("step", 10, 0, 1.0)(3)
