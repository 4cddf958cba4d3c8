"""`gpu_peak_gib` in metrics.jsonl: the training steps' peak GPU memory apart from the evaluations' (the throughput
benchmark's peak took in the final evaluation's)."""

import json

import pytest
import torch

from sak.engine import train
from sak.engine.logging import GpuPeak


def logged(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_steps_peak_is_carried_past_an_evaluation_and_the_evaluation_has_its_own(monkeypatch):
    """Counters read and reset: a training row takes the steps since the previous training row, those before an
    evaluation included; the evaluation row takes the evaluation alone."""
    gib, readings = 2**30, []
    peak = {"now": 0}

    def allocate(n):
        peak["now"] = max(peak["now"], n * gib)

    def reset(device):
        readings.append(peak["now"] / gib)
        peak["now"] = 0

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: peak["now"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    memory = GpuPeak(torch.device("cuda", 0))
    allocate(3)
    assert memory.steps() == {"gpu_peak_gib": 3.0}
    allocate(5)  # steps after that row, then an evaluation
    metrics, row = memory.evaluation(lambda: allocate(2) or {"val/x": 1.0})
    assert metrics == {"val/x": 1.0} and row == {"eval_gpu_peak_gib": 2.0}
    allocate(4)
    assert memory.steps() == {"gpu_peak_gib": 5.0}  # the 5 before the evaluation, not lost
    allocate(1)
    assert memory.steps() == {"gpu_peak_gib": 1.0}
    assert readings == [3.0, 5.0, 2.0, 4.0, 1.0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="platform: training takes the GPU where there is one")
def test_a_cpu_run_logs_no_gpu_memory(tiny_recipe):
    memory = GpuPeak(torch.device("cpu"))
    assert memory.steps() == {} and memory.evaluation(lambda: {"val/x": 1.0}) == ({"val/x": 1.0}, {})
    recipe = tiny_recipe("schedule.max_steps=2", "eval.batches=1")
    train(recipe)
    assert not any("gpu_peak_gib" in row or "eval_gpu_peak_gib" in row for row in logged(recipe.run_dir))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_run_logs_each_rows_peak_and_keeps_it_out_of_the_metrics(tiny_recipe):
    recipe = tiny_recipe("schedule.max_steps=4", "eval.every=2", "eval.batches=2", "data.num_workers=0")
    final = train(recipe)
    rows = logged(recipe.run_dir)
    steps = [r for r in rows if "step_time" in r]
    evaluations = [r for r in rows if any(k.startswith("val/") for k in r)]
    assert len(steps) == 4 and len(evaluations) == 2  # (at step 2, and the final one)
    assert all(r["gpu_peak_gib"] > 0 for r in steps) and all(r["eval_gpu_peak_gib"] > 0 for r in evaluations)
    assert not any("eval_gpu_peak_gib" in r for r in steps) and not any("gpu_peak_gib" in r for r in evaluations)
    final_file = json.loads((recipe.run_dir / "final_metrics.json").read_text())
    assert not any("gpu_peak" in key for key in [*final, *final_file])
