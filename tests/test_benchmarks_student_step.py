"""benchmarks/student_step.py (a cached step split into nested parts, each timed and its FLOPs counted) and
benchmarks/activation_memory.py (what grad_checkpointing keeps)."""

import json

import torch

from benchmarks.student_step import VARIANTS, Variants, main
from sak.config import load_recipe
from tests.conftest import TESTS, TINY


def test_each_variant_adds_its_part_and_only_the_last_steps_the_optimiser():
    """`vit` trains the stem alone, `student` every path too, `student + losses` the recipe's losses (with
    normalised targets), and only `step` moves the weights."""
    recipe = load_recipe(TINY, ["loss.normalize=standardize"])
    variants = Variants(recipe, torch.device("cpu"))
    stem = {id(p) for p in variants.student.stem.parameters()}
    before = [p.detach().clone() for p in variants.student.parameters()]
    for name in VARIANTS[:3]:
        variants.optimizer.zero_grad(set_to_none=False)  # keep the gradients to look at them
        variants.optimizer.zero_grad = lambda set_to_none=True: None
        variants.run(name)
        touched = {id(p) for p in variants.student.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert (touched <= stem) == (name == "vit"), name
        del variants.optimizer.zero_grad
        variants.optimizer.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(before, variants.student.parameters(), strict=True))
    assert variants.step == 1 and int(variants.normalizers.norms["vit_a"][0].count) > 0  # `student + losses`
    variants.run("step")
    assert not all(torch.equal(a, b) for a, b in zip(before, variants.student.parameters(), strict=True))


def test_writes_the_table_with_counted_flops(tmp_path):
    assert main(["--recipe", str(TESTS / "tiny.yaml"), "--steps", "1", "--warmup", "0", "--eager-only",
                 "--results", str(tmp_path), "--name", "s", "loss.normalize=standardize"]) == 0  # fmt: skip
    r = json.loads((tmp_path / "s.json").read_text())
    flops = [r["variants"][name]["flop"] for name in VARIANTS]
    # the flop counter counts products only: the tiny losses resize nothing (equal grids), AdamW is elementwise
    assert 0 < flops[0] < flops[1] == flops[2] == flops[3]
    assert r["normalizer_ms"] > 0 and r["batch"] == 4
    md = (tmp_path / "s.md").read_text()
    assert md.count("\n| ") == 2 + len(VARIANTS) and "normalisation" in md
    assert not (tmp_path / "s_profile.txt").exists()


def test_profile_writes_the_steps_operators_by_their_own_time(tmp_path):
    assert main(["--recipe", str(TESTS / "tiny.yaml"), "--steps", "1", "--warmup", "0", "--eager-only", "--profile",
                 "--results", str(tmp_path), "--name", "s"]) == 0  # fmt: skip
    text = (tmp_path / "s_profile.txt").read_text()
    assert text.startswith("python -m benchmarks.student_step") and "Self CPU" in text and "aten::addmm" in text
    assert "profile" not in json.loads((tmp_path / "s.json").read_text())


def test_activation_memory_counts_less_kept_with_grad_checkpointing(tmp_path):
    from benchmarks.activation_memory import main as activation_memory

    recipe = str(TESTS / "tiny_multitask.yaml")
    assert activation_memory(["--recipes", recipe, "--repeats", "1", "--results", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "activation_memory.json").read_text())["rows"]
    assert 0 < row["checkpointing_mib_per_image"] < row["plain_mib_per_image"]
    # per image is the slope of two batch sizes; the weights autograd saves (and autocast's copies) are fixed
    assert row["plain_mib_fixed"] > 0 and row["checkpointing_mib_fixed"] >= 0
    assert "| 64 | no |" in (tmp_path / "activation_memory.md").read_text()
