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


def test_warmup_in_epochs_is_the_whole_number_of_steps_it_comes_to():
    """2.3 epochs of 100 steps are 230 warm-up steps; the float product 229.99999999999997 gave 229."""
    from sak.config import load_recipe
    from sak.engine.build import warmup_steps
    from tests.conftest import TINY

    for epochs, per_epoch, want in ((2.3, 100, 230), (0.29, 100, 29), (1.15, 100, 115), (0.58, 50, 29), (0.5, 3, 1)):
        recipe = load_recipe(TINY, ["schedule.max_steps=null", "schedule.epochs=10", "schedule.warmup_steps=0",
                                    f"schedule.warmup_epochs={epochs}"])  # fmt: skip
        assert warmup_steps(recipe, per_epoch) == want, (epochs, per_epoch)
