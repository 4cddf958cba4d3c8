"""benchmarks/framework_overhead.py: what the engine adds to a training step, counted."""

import pytest

from benchmarks.framework_overhead import compare, count_run
from tests.conftest import TESTS, TINY


def test_the_engine_adds_a_handful_of_operations_and_no_host_wait_to_a_step():
    """Stage 2 with six task losses, two teachers and gradient clipping: against the bare loop of the same
    modules, the engine dispatches a few scalar operations a step (Accelerate's loss scaling and its gradient,
    the logged losses stacked once, the gradient norm joined to them, the reduction's copy) and one copy of the
    heads' batch-norm statistics, not a few per logged loss, and reads the device once (losses and gradient norm together), as the bare loop does."""
    recipe = TESTS / "tiny_multitask.yaml"
    for loop in ("bare", "sak"):  # what this process builds once and keeps, before counting
        count_run(recipe, loop, 1, [])
    result = compare(recipe, fresh=False)
    assert sum(result["bare"]["host_waits"].values()) == 1, result["bare"]
    assert sum(result["sak"]["host_waits"].values()) == 1, result["sak"]
    added = {op for op, n in result["extra_by_op"].items() if n > 0}
    # _foreach_copy_: the heads' batch-norm running statistics kept at the step's start, to be put back if it is
    # skipped as non-finite (one copy of all of them)
    assert added <= {"cat", "clone", "detach", "div", "stack", "view", "_foreach_copy_"}, result["extra_by_op"]
    assert result["extra_by_op"].get("_foreach_copy_", 0) == 1, result["extra_by_op"]
    assert 0 < result["extra_launching"] <= 6, result


def test_without_clipping_the_engine_adds_the_gradient_norm_it_checks_and_no_host_wait():
    """A recipe that does not clip: the engine still takes the gradient norm (a step with a NaN gradient is
    skipped, not stepped into the weights), one fused norm over the gradients and the norm of those norms,
    read back with the losses in the step's one wait; the bare loop takes none."""
    for loop in ("bare", "sak"):
        count_run(TINY, loop, 1, [])
    result = compare(TINY, fresh=False)
    assert sum(result["bare"]["host_waits"].values()) == 1, result["bare"]
    assert sum(result["sak"]["host_waits"].values()) == 1, result["sak"]
    added = {op for op, n in result["extra_by_op"].items() if n > 0}
    assert {"_foreach_norm", "linalg_vector_norm"} <= added, result["extra_by_op"]
    allowed = {"_foreach_norm", "linalg_vector_norm", "cat", "clone", "detach", "div", "stack", "view"}
    assert added <= allowed, result["extra_by_op"]
    assert result["extra_launching"] <= 8, result


@pytest.mark.parametrize("mode", ["standardize", "phi_s"])
def test_normalising_the_targets_adds_no_host_wait(mode):
    """loss.normalize's running statistics, in both loops: no count made from a Python number, no Hadamard
    matrix built and copied from the host, no PHI-S scale read back, at any step."""
    overrides = [f"loss.normalize={mode}"]
    for loop in ("bare", "sak"):
        count_run(TINY, loop, 1, overrides)
    result = compare(TINY, overrides, fresh=False)
    assert sum(result["bare"]["host_waits"].values()) == 1, result["bare"]
    assert sum(result["sak"]["host_waits"].values()) == 1, result["sak"]
