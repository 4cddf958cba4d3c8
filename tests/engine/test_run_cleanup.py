"""What a run lets go of: its trackers however it ends, its last training batch and loader before the final
evaluation."""

import gc
import threading
import warnings

import psutil
import pytest
import torch

import sak.engine.trainer as trainer_module
from sak.engine import train


def test_a_run_that_fails_leaves_no_tracker_running(tiny_recipe, monkeypatch):
    """An error mid-run (not the non-finite stop) left TensorBoard's writer thread running, one more per call
    (a notebook or a sweep calling train again), and wandb's log file open."""
    calls = []
    compute_losses = trainer_module.compute_losses

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("injected")
        return compute_losses(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "compute_losses", failing)
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="injected"):
        train(tiny_recipe("logging.tensorboard=true", "schedule.max_steps=5"))
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not left, left


def test_the_final_evaluation_holds_no_training_batch_or_loader_worker(tiny_recipe, monkeypatch):
    """The last batch lived through every evaluation and save; with data.prefetch_to_device the prefetching
    generator kept the loader's workers and the batches it had sent ahead through the final evaluation."""

    def alive() -> tuple[int, int]:  # (image batches of the recipe's shape, loader workers)
        gc.collect()
        with warnings.catch_warnings():  # (isinstance on torch.distributed's deprecated reduce_op object warns)
            warnings.simplefilter("ignore", FutureWarning)
            batches = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and tuple(o.shape) == (4, 3, 64, 64)]
        return len(batches), len(psutil.Process().children())

    seen = []
    evaluate = trainer_module.evaluate

    def counting(*args, **kwargs):
        seen.append(alive())
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate", counting)
    before = alive()  # (what earlier tests of the session left)
    train(tiny_recipe("schedule.max_steps=3", "data.num_workers=2", "data.prefetch_to_device=true", "eval.batches=1"))
    assert seen[-1] == before, (seen, before)


@pytest.mark.parametrize(("error", "code"), [(RuntimeError("injected"), 1), (KeyboardInterrupt(), 255), (None, 0)])
def test_wandb_records_a_run_ended_by_an_error_as_failed(tiny_recipe, monkeypatch, error, code):
    """Closed as the error propagated, wandb's own finish() recorded exit code 0, "finished", for a run that
    failed or was stopped by Ctrl-C (its hooks, which record 1 or 255, had not run yet)."""
    from sak.engine.logging import RunLogger

    codes = []
    close = RunLogger.close
    monkeypatch.setattr(RunLogger, "close", lambda self, exit_code=0: codes.append(exit_code) or close(self, exit_code))
    evaluate = trainer_module.evaluate

    def failing(*args, **kwargs):
        if error is not None:
            raise error
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate", failing)
    recipe = tiny_recipe("schedule.max_steps=1", "logging.wandb.mode=offline")
    if error is None:
        train(recipe)
    else:
        with pytest.raises(type(error)):
            train(recipe)
    assert codes == [code]


def test_close_hands_wandb_the_exit_code_and_finishes_other_trackers():
    import types

    from sak.engine.logging import RunLogger

    said = []
    wandb = types.SimpleNamespace(
        name="wandb", run=types.SimpleNamespace(finish=lambda exit_code=None: said.append(exit_code))
    )
    board = types.SimpleNamespace(name="tensorboard", finish=lambda: said.append("tensorboard"))
    logger = RunLogger.__new__(RunLogger)
    logger.bar, logger.trackers, logger.accelerator = None, True, types.SimpleNamespace(trackers=[wandb, board])
    logger.close(255)
    assert said == [255, "tensorboard"] and logger.accelerator.trackers == []
