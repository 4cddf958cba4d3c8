"""Shared fixtures: a tiny recipe in a temporary run directory, and a clean Accelerate state per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TINY = TESTS / "tiny.yaml"


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process run must start from scratch."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def tiny_recipe(tmp_path):
    """load(overrides...) -> the tiny test recipe writing into tmp_path."""
    from sak.config import load_recipe

    def load(*overrides: str, path: Path = TINY):
        return load_recipe(path, [f"run.output_dir={tmp_path}", *overrides])

    return load
