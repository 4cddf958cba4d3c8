"""CPU training keeps freed memory in the process (glibc mallopt), so large tensors are not page-faulted
in again at every step; and the optimiser uses AdamW's fused kernel unless the recipe says otherwise."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sak.config import load_recipe
from sak.engine.build import build_optimizer

ROOT = Path(__file__).resolve().parents[2]

# The page faults of three (8, 128, 56, 56) float32 tensors (12.8 MB each) allocated and freed per step.
FAULTS = """
import resource, sys, torch
if sys.argv[1] == "tuned":
    from sak.engine.malloc import keep_freed_memory
    if not keep_freed_memory():
        print("unsupported")
        sys.exit(0)
def step():
    a = torch.ones(8, 128, 56, 56); b = a * 2; c = b + a; return c.sum().item()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 40)
"""


def faults_per_step(mode: str) -> str:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_freed_tensors_are_reused_instead_of_faulted_in_again():
    tuned = faults_per_step("tuned")  # in a child process: the test process's allocator is left alone
    if tuned == "unsupported":
        pytest.skip("platform: no glibc mallopt here; sak leaves its allocator alone")
    pages = 3 * 8 * 128 * 56 * 56 * 4 / 4096  # the three tensors' pages (9408)
    # glibc's defaults fault in a varying part of them again every step (2000-6400 measured here);
    # with the thresholds raised the freed memory is reused and next to nothing is faulted in
    assert float(tuned) < pages / 10, (tuned, faults_per_step("default"))


def test_adamw_is_fused_unless_the_recipe_says_otherwise():
    model = torch.nn.Linear(3, 2)
    assert build_optimizer(load_recipe(ROOT / "tests" / "tiny.yaml"), model).defaults["fused"] is True
    off = load_recipe(ROOT / "tests" / "tiny.yaml", ["optim.fused=false"])
    assert not build_optimizer(off, model).defaults["fused"]
