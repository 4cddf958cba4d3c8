"""Start a student from an earlier run's weights (stage 2 from stage 1)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from ..losses.normalize import TargetNormalizers
from ..teachers.weights import first_misfit
from .checkpoint import latest_checkpoint

NEW_IN_STAGE_2 = ("routers.", "heads.")  # the task side of the student


def student_weights_file(path: Path, what: str = "checkpoint.init_from") -> Path:
    """A checkpoint directory, a run directory (its latest checkpoint), a .safetensors file, or (not for
    `checkpoint.init_from`) an export directory; `what` names the setting or flag that gave `path` in the error."""
    if path.is_file():
        return path
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    latest = latest_checkpoint(path / "checkpoints")
    if latest is not None:
        return latest / "model.safetensors"
    if (path / "student.yaml").is_file() and what != "checkpoint.init_from":
        return path / "student.safetensors"  # an export (sak export) exported again, with its weights as they are
    if (path / "student.yaml").is_file():
        raise ValueError(
            f"{what}: {str(path)!r} is an export (sak export), which keeps no distillation-only aligners to train "
            "on with; give the run or checkpoint directory it was exported from"
        )
    export = "" if what == "checkpoint.init_from" else ", an export directory (student.yaml)"
    raise FileNotFoundError(
        f"{what}: {str(path)!r} is neither a .safetensors file, a checkpoint directory with "
        f"model.safetensors{export}, nor a run directory with checkpoints/"
    )


def resize_position_embeddings(student: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """Resample the stem's position embeddings in `state` to the student's grid (stage 1 trains at 384 px,
    stage 2 at 512: 24 x 24 -> 32 x 32 for patch 16), as SAK does, with timm's bicubic resampling.
    Returns the keys it resized."""
    stem = getattr(student, "stem", None)
    if stem is None:
        return []
    vit = stem.vit
    prefix = 0 if getattr(vit, "no_embed_class", False) else stem.num_prefix_tokens
    own = student.state_dict()
    resized = []
    for key, value in state.items():
        if not key.endswith("pos_embed") or key not in own or own[key].shape == value.shape:
            continue
        old = value.shape[1] - prefix
        side = int(round(old**0.5))
        if side * side != old:  # another number of prefix tokens (registers): left to the shape check below,
            continue  # which names the file and both shapes, rather than a grid that is not the cause
        new_grid = list(vit.patch_embed.grid_size)
        state[key] = resample_abs_pos_embed(value, new_grid, [side, side], num_prefix_tokens=prefix)
        resized.append(f"{key}: {side}x{side} -> {new_grid[0]}x{new_grid[1]}")
    return resized


def init_student_from(student: nn.Module, path: Path) -> list[str]:
    """Load matching weights; only routers and heads (new in stage 2) may be missing. Returns them.

    Position embeddings of a stem trained at another resolution are resampled to this student's grid."""
    file = student_weights_file(path)
    try:
        state = load_file(str(file))
    except Exception as exc:  # safetensors raises its own types for a file of another format or a damaged one
        raise ValueError(f"checkpoint.init_from {str(file)!r}: not a readable safetensors file ({exc})") from exc
    resize_position_embeddings(student, state)
    own = student.state_dict()
    misfits = [k for k in own if k in state and own[k].shape != state[k].shape]  # in the model's order: stem first
    if misfits:  # load_state_dict would raise a RuntimeError listing every one of them
        shown = ", ".join(f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here" for k in misfits[:3])
        raise ValueError(
            f"checkpoint.init_from {str(file)!r}: {len(misfits)} weight(s) have other shapes than this student's "
            f"({shown}{', ...' if len(misfits) > 3 else ''}): that run trained another student (student.model, "
            "model_kwargs, down_ratio) or other teachers' widths"
        )
    result = student.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(
            f"checkpoint.init_from {str(file)!r}: keys the student does not have: {result.unexpected_keys[:8]}"
        )
    bad = [k for k in result.missing_keys if not k.startswith(NEW_IN_STAGE_2)]
    if bad:
        exported = all(k.startswith(("aligners.", "projections.")) for k in bad)
        raise ValueError(
            f"checkpoint.init_from {str(file)!r}: student weights missing from the file: {bad[:8]}"
            + ("; an export (sak export) drops these distillation-only weights: give the run or checkpoint "
               "directory it was exported from" if exported else "")
        )  # fmt: skip
    return result.missing_keys


def init_normalizers_from(normalizers: TargetNormalizers | None, path: Path) -> str | None:
    """Start the target statistics (`loss.normalize`) from those saved beside `checkpoint.init_from`'s weights.

    The aligners learnt to predict targets normalised by that run's map; statistics estimated afresh gave
    them, from stage 2's first step, targets in another basis (for phi_s, eigenvectors of other signs). The
    statistics go on gathering on this run's schedule. Returns what the run's log should say, or None."""
    file = student_weights_file(path).parent / "target_normalizers.safetensors"
    if normalizers is None:
        return None if not file.is_file() else (
            f"[sak] warning: checkpoint.init_from {str(path)!r} trained on normalised targets ({file.name}) and this "
            "recipe has loss.normalize none: its aligners start on the teachers' raw features"
        )  # fmt: skip
    if not file.is_file():
        return (
            f"[sak] checkpoint.init_from {str(path)!r} holds no target statistics (its run had loss.normalize none): "
            "they are gathered afresh"
        )
    try:
        state = load_file(str(file))
    except Exception as exc:  # safetensors raises its own types for a file of another format or a damaged one
        raise ValueError(f"checkpoint.init_from {str(file)!r}: not a readable safetensors file ({exc})") from exc
    before = {k: v.clone() for k, v in normalizers.state_dict().items()}
    try:
        normalizers.load_state_dict(state)
    except RuntimeError as exc:  # other teachers' levels or widths, or another loss.normalize mode
        normalizers.load_state_dict(before)  # (it has loaded the tensors that fit, the counts among them)
        return (
            f"[sak] warning: the target statistics of checkpoint.init_from {str(file)!r} do not fit this recipe's "
            f"loss.normalize ({first_misfit(exc)}): they are gathered afresh"
        )
    return f"[sak] target statistics from {str(file)!r} (checkpoint.init_from): the normalising maps go on from them"


def init_run_from(student: nn.Module, normalizers: TargetNormalizers | None, path: Path) -> str | None:
    """`checkpoint.init_from` for a new run: the student's weights and the target statistics. Returns the note
    for the run's log: which weights file, which parts of the student it did not hold, and the statistics."""
    missing = init_student_from(student, path)
    parts = sorted({k.split(".")[0] for k in missing})
    note = f"[sak] student weights from {str(student_weights_file(path))!r} (checkpoint.init_from)" + (
        f"; new here, not in them: {', '.join(parts)}" if parts else ""
    )
    statistics = init_normalizers_from(normalizers, path)
    return note if statistics is None else f"{note}\n{statistics}"
