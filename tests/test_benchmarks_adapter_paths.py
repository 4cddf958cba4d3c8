"""benchmarks/adapter_paths.py: the teachers' adapter paths one after another, or batched into one product each."""

import json

import torch

from benchmarks.adapter_paths import batched, main, per_path
from sak.student.adapters import TeacherSpecificAdapterPath


def test_batched_paths_compute_what_the_paths_compute_forward_and_backward():
    """The batched form (parameters stacked per call) gives every path's levels and every gradient, float64."""
    torch.manual_seed(0)
    paths = [TeacherSpecificAdapterPath(8, 4, [1, 3]).double() for _ in range(3)]
    for p in (q for path in paths for q in path.parameters()):
        p.data.add_(torch.randn_like(p) * 0.1)
    embedded = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    blocks = [torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    inputs = [embedded, *blocks, *(q for path in paths for q in path.parameters())]
    want, got = per_path(paths, embedded, blocks), batched(paths, embedded, blocks)
    assert len(got) == len(want) == 6
    grads = [torch.randn_like(x) for x in want]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, inputs, grads), torch.autograd.grad(want, inputs, grads), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_writes_the_table(tmp_path):
    assert main(["--batch", "2", "--tokens", "5", "--dim", "16", "--depth", "4", "--repeats", "1", "--warmup", "0",
                 "--no-compile", "--device", "cpu", "--results", str(tmp_path)]) == 0  # fmt: skip
    r = json.loads((tmp_path / "adapter_paths_cpu.json").read_text())
    assert [x["way"] for x in r["rows"]] == ["per path", "batched"] and r["dtype"] == "float32"
    assert all(x["seconds"] > 0 and x["max_abs_difference"] < 1e-5 for x in r["rows"])
    assert "3 paths of 5 bottleneck adapters (16 -> 4 -> 16)" in (tmp_path / "adapter_paths_cpu.md").read_text()
