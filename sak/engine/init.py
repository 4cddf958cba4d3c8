"""Start a student from an earlier run's weights (stage 2 from stage 1)."""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from ..losses.normalize import TargetNormalizers
from ..teachers.weights import first_misfit
from .checkpoint import first_nonfinite, latest_checkpoint, on_every_process, read_weights

NEW_IN_STAGE_2 = ("routers.", "heads.")  # the task side of the student


def one_checkpoint(accelerator, path: Path) -> Path:
    """A run directory's latest checkpoint, chosen by the main process for every process; any other path as it
    is. Each process looking it up on its own (and each reader in one process) could take another checkpoint, one a
    training saved meanwhile: `sak eval` scored its processes' images with different weights, one number for no
    model, and `checkpoint.init_from` could take the target statistics of another checkpoint than the weights."""

    def latest() -> Path | None:
        if accelerator.is_main_process and path.is_dir():
            if not (path / "model.safetensors").is_file() and not (path / "student.yaml").is_file():
                return latest_checkpoint(path / "checkpoints")
        return None

    if accelerator.num_processes == 1:
        chosen = latest()
    else:  # (the main process's error raised in every process: the others would wait at the broadcast)
        from accelerate.utils import broadcast_object_list

        shared = [on_every_process(accelerator, latest, f"could not look up the latest checkpoint of {path}")]
        broadcast_object_list(shared)
        chosen = shared[0]
    return path if chosen is None else chosen


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


def saved_recipe(file: Path):
    """The recipe.yaml every checkpoint holds beside the weights `file`, as YAML data; None without a readable one."""
    recipe = file.parent / "recipe.yaml"
    try:
        return yaml.safe_load(recipe.read_text()) if recipe.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def saved_grid(file: Path, patch: int) -> tuple[int, int] | None:
    """The position-embedding grid of the run that saved the weights `file`, from the recipe.yaml every checkpoint
    holds beside them (`student.input_size`, else data.image_size square, over the patch size); None without it."""
    data = saved_recipe(file)
    try:
        student, size = data.get("student") or {}, (data.get("data") or {}).get("image_size")
        h, w = student.get("input_size") or (size, size)
        return int(h) // patch, int(w) // patch
    except (AttributeError, TypeError, ValueError):  # not a recipe sak wrote: assume a square grid
        return None


def saved_normalization(file: Path) -> tuple[tuple, tuple] | None:
    """The input mean / std of the student of the run that saved the weights `file`, from its recipe.yaml (the
    student's model, pretrained and normalization, resolved as TeacherAgnosticStem does); None without one."""
    from timm.models import get_pretrained_cfg

    from ..teachers.base import IMAGENET_MEAN, IMAGENET_STD
    from ..teachers.weights import is_timm_file

    try:
        student = saved_recipe(file).get("student") or {}
        if student.get("normalization", "pretrained") == "imagenet":
            return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
        model, pretrained = str(student["model"]), student.get("pretrained")
        hub = pretrained is not None and not is_timm_file(str(pretrained))
        cfg = get_pretrained_cfg(f"{model.split('.')[0]}.{pretrained}" if hub else model)
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError):
        return None  # not a recipe sak wrote, or a model this timm does not know: nothing to compare
    if cfg is None or cfg.mean is None or cfg.std is None:  # (no config registered, e.g. a plug-in model's:
        return None  # timm builds the stem's from defaults, which this cannot know to be the same)
    return tuple(cfg.mean), tuple(cfg.std)


def resize_position_embeddings(
    student: nn.Module, state: dict[str, Tensor], source: tuple[int, int] | None = None
) -> list[str]:
    """Resample the stem's position embeddings in `state` to the student's grid (stage 1 trains at 384 px,
    stage 2 at 512: 24 x 24 -> 32 x 32 for patch 16; NYUD's stage 2 28 x 36), as SAK does, with timm's bicubic
    resampling. `source`: the grid `state` was trained at (`saved_grid`); without it a square one is assumed.
    Returns the keys it resized."""
    stem = getattr(student, "stem", None)
    if stem is None:
        return []
    vit = stem.vit
    prefix = 0 if getattr(vit, "no_embed_class", False) else stem.num_prefix_tokens
    own = student.state_dict()
    new_grid = list(vit.patch_embed.grid_size)
    resized = []
    for key, value in state.items():
        if not key.endswith("pos_embed") or key not in own:
            continue
        old = value.shape[1] - prefix
        side = int(round(old**0.5))
        grid = list(source) if source is not None and source[0] * source[1] == old else [side, side]
        if grid[0] * grid[1] != old:  # another number of prefix tokens (registers), or a non-square grid of a run
            continue  # without its recipe.yaml: left to the shape check, which names the file and both shapes
        if own[key].shape == value.shape and grid == new_grid:  # (3 x 4 into 4 x 3 has as many tokens: resampled)
            continue
        # bicubic without antialiasing, as SAK's update_weights (timm's default antialias=True takes PIL's
        # cubic, a = -0.5, where the plain one has a = -0.75: another embedding even when upsampling)
        state[key] = resample_abs_pos_embed(value, new_grid, grid, num_prefix_tokens=prefix, antialias=False)
        resized.append(f"{key}: {grid[0]}x{grid[1]} -> {new_grid[0]}x{new_grid[1]}")
    return resized


def init_student_from(student: nn.Module, path: Path) -> list[str]:
    """Load matching weights; only routers and heads (new in stage 2) may be missing. Returns them.

    Position embeddings of a stem trained at another resolution are resampled to this student's grid."""
    file = student_weights_file(path)
    state = read_weights(file, "checkpoint.init_from")
    bad = first_nonfinite(state.items())
    if bad is not None:  # (else every step of the new run is non-finite, and the error blames the learning rate)
        raise ValueError(f"checkpoint.init_from {str(file)!r} holds NaN or inf weights ({bad}): a damaged file, or "
                         "a run that diverged; start from an earlier checkpoint of that run")  # fmt: skip
    stem = getattr(student, "stem", None)
    saved = saved_normalization(file) if stem is not None else None
    if saved is not None and not all(map(math.isclose, saved[0] + saved[1], (*stem.mean, *stem.std))):
        raise ValueError(
            f"checkpoint.init_from {str(file)!r}: that run fed its student images normalised by mean {saved[0]} / "
            f"std {saved[1]} (its recipe.yaml's student.normalization, pretrained and model), this recipe's gets "
            f"{tuple(stem.mean)} / {tuple(stem.std)}: set student.normalization and student.pretrained as that run's"
        )
    resize_position_embeddings(student, state, saved_grid(file, stem.patch_size) if stem is not None else None)
    own = student.state_dict()
    misfits = [k for k in own if k in state and own[k].shape != state[k].shape]  # in the model's order: stem first
    if misfits:  # load_state_dict would raise a RuntimeError listing every one of them
        shown = ", ".join(f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here" for k in misfits[:3])
        if all(k.startswith("heads.") for k in misfits):  # (a stage-2 run of another dataset: its heads' classes)
            other = "other task heads (tasks[].channels: another dataset's classes); start from its stage-1 run"
        elif all(k.startswith(NEW_IN_STAGE_2) for k in misfits):  # a router has an expert per teacher, plus one
            other = "routers over another number of teachers (an expert per teacher, and the stem's)"
        else:
            other = "another student (student.model, model_kwargs, down_ratio, input_size) or other teachers' widths"
        raise ValueError(
            f"checkpoint.init_from {str(file)!r}: {len(misfits)} weight(s) have other shapes than this student's "
            f"({shown}{', ...' if len(misfits) > 3 else ''}): that run trained {other}"
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
    state = read_weights(file, "checkpoint.init_from")
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
    parts = []  # a part wholly new by its name (heads); of one partly new, its new members (heads.fg)
    # (what the file gave; batch norm's step count, never reported missing, left out)
    absent = set(missing)
    loaded = {k for k in student.state_dict() if k not in absent and not k.endswith(".num_batches_tracked")}
    for top in sorted({k.split(".")[0] for k in missing}):
        new = [k for k in missing if k.split(".")[0] == top]
        whole = not any(k.split(".")[0] == top for k in loaded)
        parts += [top] if whole else sorted({".".join(k.split(".")[:2]) for k in new})
    note = f"[sak] student weights from {str(student_weights_file(path))!r} (checkpoint.init_from)" + (
        f"; new here, not in them: {', '.join(parts)}" if parts else ""
    )
    statistics = init_normalizers_from(normalizers, path)
    return note if statistics is None else f"{note}\n{statistics}"
