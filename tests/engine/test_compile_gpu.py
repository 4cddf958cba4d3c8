"""precision.compile_mode reduce-overhead on a CUDA device: the compiled student, teachers and loss replayed as
CUDA graphs train as the eager run does, with gradient accumulation too (gpu-marked)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sak.engine import train
from sak.engine.checkpoint import latest_checkpoint


def logged(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("accum", [1, 2])
def test_cuda_graph_training_equals_eager_training(accum, tiny_recipe, monkeypatch):
    """Same losses, held-out metrics and weights as eager training (to the compiled roundings: Adam's first
    steps turn them into up to ~3e-5 in the weights, where a wrong gradient moves them by about the learning
    rate, 1e-3), and the graphs really replayed: inductor skipped CUDA graphs for none of the compiled graphs.
    A loop that kept a graph's output across steps, or gradient accumulation adding to the last micro-batch's
    gradients left in a graph's memory (the trainer keeps them in buffers of its own), would fail here with
    PyTorch's error about an output overwritten by a later run, or give other weights. Eager, not the default
    compiled mode, is the reference: half the compiling, so that the test fits a short GPU call."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    calls = {"record_function": 0, "execute_node": 0}  # CUDA graphs recorded, and replayed
    for name in calls:
        original = getattr(cudagraph_trees.CUDAGraphTreeManager, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, name, counted)
    grads = []  # each optimiser step's gradient addresses
    adamw_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        grads.append([p.grad.data_ptr() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)

    common = [f"optim.grad_accum={accum}", "schedule.max_steps=4", "data.num_workers=0", "eval.batches=2",
              "eval.every=2"]  # fmt: skip
    eager = tiny_recipe(*common, f"run.name=eager{accum}")
    train(eager)
    counters.clear()
    calls.update(record_function=0, execute_node=0)
    grads.clear()
    graphs = tiny_recipe(*common, f"run.name=graphs{accum}", "precision.compile_student=true",
                         "precision.compile_teachers=true", "precision.compile_losses=true",
                         "precision.compile_mode=reduce-overhead")  # fmt: skip
    train(graphs)
    assert not counters["inductor"].get("cudagraph_skips"), dict(counters["inductor"])
    assert calls["record_function"] > 0 and calls["execute_node"] > 0, calls
    assert len(grads) == 4 and all(grads)
    if accum > 1:  # the trainer's own buffers, the same every step (sak.engine.trainer.keep_gradient_buffers)
        assert all(g == grads[0] for g in grads), "gradient buffers changed between steps"
    a, b = logged(eager.run_dir), logged(graphs.run_dir)
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        for key in ra.keys() & {"loss", "grad_norm"} | {k for k in ra if k.startswith("val/")}:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), key
    wa = load_file(str(latest_checkpoint(eager.run_dir / "checkpoints") / "model.safetensors"))
    wb = load_file(str(latest_checkpoint(graphs.run_dir / "checkpoints") / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-3, atol=1e-4, msg=key)
