"""benchmarks/router_mix.py: the routers' mixing as one batched product against elementwise multiply-adds."""

import json

from benchmarks.router_mix import main


def test_both_ways_are_timed_and_mix_the_same(tmp_path):
    assert main(["--batch", "2", "--tokens", "8", "--dim", "16", "--repeats", "1", "--warmup", "0", "--no-compile",
                 "--device", "cpu", "--results", str(tmp_path)]) == 0  # fmt: skip
    r = json.loads((tmp_path / "router_mix_cpu.json").read_text())
    assert r["command"].startswith("python -m benchmarks.router_mix --batch 2")
    assert [x["way"] for x in r["rows"]] == ["batched product", "multiply-add"]
    for x in r["rows"]:
        assert x["seconds"] > 0 and x["max_abs_difference"] < 1e-6
    md = (tmp_path / "router_mix_cpu.md").read_text()
    assert md.count("\n| ") == 4 and "5 tasks mix 4 experts of (2, 8, 16)" in md


def test_per_token_weights_are_timed_both_ways_and_mix_the_same(tmp_path):
    args = ["--batch", "2", "--tokens", "8", "--dim", "16", "--repeats", "1", "--warmup", "0", "--no-compile"]
    assert main([*args, "--device", "cpu", "--per-token", "--results", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "router_mix_cpu_per_token.json").read_text())
    assert [x["way"] for x in r["rows"]] == ["batched product", "multiply-add"]
    assert all(x["max_abs_difference"] < 1e-6 for x in r["rows"])
    assert "with per-token weights" in (tmp_path / "router_mix_cpu_per_token.md").read_text()
