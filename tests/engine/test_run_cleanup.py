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
    seen = []
    evaluate = trainer_module.evaluate

    def counting(*args, **kwargs):
        gc.collect()
        with warnings.catch_warnings():  # (isinstance on torch.distributed's deprecated reduce_op object warns)
            warnings.simplefilter("ignore", FutureWarning)
            batches = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and tuple(o.shape) == (4, 3, 64, 64)]
        seen.append((len(batches), len(psutil.Process().children())))
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate", counting)
    train(tiny_recipe("schedule.max_steps=3", "data.num_workers=2", "data.prefetch_to_device=true", "eval.batches=1"))
    assert seen[-1] == (0, 0), seen
