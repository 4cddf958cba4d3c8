"""build_metric, the additive state, load_state and sync_metric, for every task."""

import multiprocessing
import os
import socket

import numpy as np
import pytest
import torch

from sak.metrics import METRICS, build_metric, sync_metric
from sak.metrics.base import Metric


def _batch(task: str, rng: np.random.Generator, n: int = 2, size: int = 24):
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    shape = (n, size, size)
    if task in ("semseg", "parts"):
        target = torch.randint(0, 7, shape, generator=g)
        target[:, :3] = 255
        return torch.randint(0, 7, shape, generator=g), target
    if task == "saliency":
        target = (torch.rand(shape, generator=g) > 0.5).float()
        target[:, :3] = 255
        return torch.rand(shape, generator=g)[:, None], target[:, None]
    if task == "normals":
        target = torch.randn(n, 3, size, size, generator=g)
        target[:, :, :3] = 0
        return torch.randn(n, 3, size, size, generator=g), target
    if task == "depth":
        target = torch.rand(shape, generator=g) * 5
        target[:, :3] = 0
        return torch.rand(shape, generator=g)[:, None] * 5, target[:, None]
    if task == "edges":
        target = torch.zeros(shape)
        target[:, 8, 4:20] = 1
        target[:, 4:20, 15] = 1
        pred = target * torch.rand(shape, generator=g) + 0.3 * torch.rand(shape, generator=g)
        return pred[:, None].clamp(0, 1), target[:, None]
    raise AssertionError(task)


def _build(task: str) -> Metric:
    return build_metric(task, "nyud" if task == "depth" else "pascal_context")


@pytest.mark.parametrize("task", METRICS.names())
def test_states_of_two_shards_sum_to_the_state_of_both(task):
    rng = np.random.default_rng(0)
    shard_a, shard_b = _batch(task, rng), _batch(task, rng)
    one, two, both = _build(task), _build(task), _build(task)
    one.update(*shard_a)
    two.update(*shard_b)
    both.update(*shard_a)
    both.update(*shard_b)
    summed = {k: one.state()[k] + two.state()[k] for k in both.state()}
    for key, value in both.state().items():
        assert torch.allclose(summed[key], value, rtol=1e-12, atol=1e-9), key
    merged = _build(task)
    merged.load_state(summed)
    assert merged.compute() == pytest.approx(both.compute(), rel=1e-9)


@pytest.mark.parametrize("task", METRICS.names())
def test_load_state_round_trip_and_reset(task):
    metric = _build(task)
    metric.update(*_batch(task, np.random.default_rng(1)))
    copy = _build(task)
    copy.load_state(metric.state())
    assert copy.compute() == metric.compute()
    metric.reset()
    assert all(not v.any() for v in metric.state().values())
    state = metric.state()
    for value in state.values():
        assert value.device.type == "cpu" and value.dtype in (torch.int64, torch.float64)


def test_load_state_checks_keys_and_shapes():
    metric = build_metric("semseg", "pascal_context")
    with pytest.raises(ValueError, match="expected \\['confusion'\\]"):
        metric.load_state({"tp": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"shape \(40, 40\), expected \(21, 21\)"):
        metric.load_state({"confusion": torch.zeros(40, 40)})


def test_dataset_defaults():
    assert build_metric("semseg", "pascal_context").num_classes == 21
    assert build_metric("semseg", "nyud").num_classes == 40
    assert build_metric("parts", "pascal_context").num_classes == 7
    assert build_metric("edges", "pascal_context").tolerance == 0.0075
    assert build_metric("edges", "nyud").tolerance == 0.011
    assert build_metric("edges", "nyud", tolerance=0.02).tolerance == 0.02  # options win
    expected = {
        "semseg": ("mIoU", True),
        "parts": ("mIoU", True),
        "saliency": ("maxF", True),
        "normals": ("mErr", False),
        "depth": ("rmse", False),
        "edges": ("odsF", True),
    }
    for task, (headline, higher) in expected.items():
        metric = _build(task)
        assert (metric.task, metric.headline, metric.higher_is_better) == (task, headline, higher)


def test_build_metric_errors_name_the_value_and_the_choices():
    with pytest.raises(ValueError, match="'nope'.*depth, edges, normals, parts, saliency, semseg"):
        build_metric("nope")
    with pytest.raises(ValueError, match="'cityscapes'.*pascal_context, nyud"):
        build_metric("semseg", "cityscapes")
    with pytest.raises(ValueError, match="'nyud' has no task 'parts'"):
        build_metric("parts", "nyud")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['classes'\].*num_classes"):
        build_metric("semseg", "nyud", classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        build_metric("semseg")
    # threshold options name themselves (they failed at the first update with numpy's or torch's words)
    for n in (0, float("inf"), float("nan")):  # (inf / nan: OverflowError / ValueError in int()'s words)
        with pytest.raises(ValueError, match=f"edges: n_thresholds must be a whole number, at least 1, got {n}"):
            build_metric("edges", n_thresholds=n)
    for step in (0, 1.5):
        with pytest.raises(ValueError, match=f"saliency: threshold_step must be in \\(0, 1\\), got {step}"):
            build_metric("saliency", threshold_step=step)


def test_a_non_finite_normals_label_is_refused_not_scored_as_90_degrees():
    pred = torch.zeros(1, 3, 1, 2)
    pred[:, 2] = 1.0
    target = pred.clone()
    target[0, 0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="normals: 1 ground-truth value.s. are NaN or infinite"):
        build_metric("normals").update(pred, target)


@pytest.mark.parametrize("task", METRICS.names())
def test_shape_mismatch_names_both_shapes(task):
    pred, target = _batch(task, np.random.default_rng(2))
    bad = target[..., :-1]
    with pytest.raises(
        ValueError, match=rf"{tuple(pred.shape)}.*{tuple(bad.shape)}".replace("(", r"\(").replace(")", r"\)")
    ):
        _build(task).update(pred, bad)


@pytest.mark.parametrize("task", [t for t in METRICS.names() if t not in ("semseg", "parts")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_prediction_is_refused_by_name(task, value):
    """A NaN saliency pixel was counted salient at every threshold, a NaN depth scored as 1e-9 m, a NaN edge
    map crashed with an IndexError; class maps (semseg, parts) are integers."""
    pred, target = _batch(task, np.random.default_rng(3))
    pred = pred.clone()
    pred.view(-1)[5] = value
    metric = _build(task)
    with pytest.raises(ValueError, match=f"{task}: 1 prediction value.s. are NaN or infinite"):
        metric.update(pred, target)


class _FakeAccelerator:
    def __init__(self, num_processes: int) -> None:
        self.num_processes = num_processes
        self.device = torch.device("cpu")
        self.calls = 0

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        self.calls += 1
        return tensor * self.num_processes  # every process holds the same state


def test_sync_metric_sums_over_processes_and_is_a_no_op_alone():
    metric = build_metric("saliency")
    metric.update(*_batch("saliency", np.random.default_rng(3)))
    before = metric.state()
    alone = _FakeAccelerator(1)
    sync_metric(metric, alone)
    assert alone.calls == 0 and all(torch.equal(before[k], v) for k, v in metric.state().items())
    pair = _FakeAccelerator(2)
    sync_metric(metric, pair)
    assert pair.calls == len(before)
    assert all(torch.equal(before[k] * 2, v) for k, v in metric.state().items())


def _score_one_shard(rank: int, port: int, queue) -> None:
    """A forked process of a two-process gloo group: scores its own shard, syncs, reports compute()."""
    try:
        torch.set_num_threads(1)  # as DataLoader workers: no OpenMP pool inherited through fork
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        scores = {}
        for task in ("semseg", "edges"):
            metric = build_metric(task, "pascal_context")
            metric.update(*_batch(task, np.random.default_rng(10 + rank)))
            sync_metric(metric, accelerator)
            scores[task] = metric.compute()
        queue.put((rank, accelerator.num_processes, scores))
    except Exception as exc:  # pragma: no cover - reported by the test
        queue.put((rank, 0, repr(exc)))


def test_sync_metric_across_two_real_processes():
    """Two CPU processes through accelerate (gloo), each scoring one shard, give the one-process score."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_score_one_shard, args=(rank, port, queue)) for rank in (0, 1)]
    for w in workers:
        w.start()
    try:
        results = [queue.get(timeout=120) for _ in workers]
    finally:
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
    single = {}
    for task in ("semseg", "edges"):
        metric = build_metric(task, "pascal_context")
        for seed in (10, 11):
            metric.update(*_batch(task, np.random.default_rng(seed)))
        single[task] = metric.compute()
    for rank, world, scores in results:
        assert world == 2, scores
        for task in single:
            assert scores[task] == pytest.approx(single[task], rel=1e-12), (rank, task)
