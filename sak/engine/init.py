"""Start a student from an earlier run's weights (stage 2 from stage 1)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from .checkpoint import latest_checkpoint

NEW_IN_STAGE_2 = ("routers.", "heads.")  # the task side of the student


def student_weights_file(path: Path) -> Path:
    """A checkpoint directory, a run directory (its latest checkpoint) or a .safetensors file."""
    if path.is_file():
        return path
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    latest = latest_checkpoint(path / "checkpoints")
    if latest is not None:
        return latest / "model.safetensors"
    raise FileNotFoundError(
        f"checkpoint.init_from: {str(path)!r} is neither a .safetensors file, a checkpoint directory with "
        "model.safetensors, nor a run directory with checkpoints/"
    )


def init_student_from(student: nn.Module, path: Path) -> list[str]:
    """Load matching weights; only routers and heads (new in stage 2) may be missing. Returns them."""
    file = student_weights_file(path)
    result = student.load_state_dict(load_file(str(file)), strict=False)
    if result.unexpected_keys:
        raise ValueError(
            f"checkpoint.init_from {str(file)!r}: keys the student does not have: {result.unexpected_keys[:8]}"
        )
    bad = [k for k in result.missing_keys if not k.startswith(NEW_IN_STAGE_2)]
    if bad:
        raise ValueError(f"checkpoint.init_from {str(file)!r}: student weights missing from the file: {bad[:8]}")
    return result.missing_keys
