"""Export a trained student for inference (no teachers, no aligners) and predict on images.

An export directory holds `student.safetensors` and `student.yaml` (the student section of the
recipe, the tasks with their channels, the teacher ids whose adapter paths the student keeps, and
the input size). `load_exported` rebuilds the model from those two files alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from ..config import Recipe, StudentConfig, TaskConfig, structure
from ..data.images import DataError, decode_rgb
from ..student import TeacherAgnosticStem, TeacherSlot
from ..tasks import create_task
from .init import student_weights_file
from .predictions import encode, save_encoded

DISTILL_ONLY = ("aligners.", "projections.")


def export_student(recipe: Recipe, source: Path, out: Path) -> Path:
    """Write the inference student of a run (or checkpoint) to `out`."""
    state = load_file(str(student_weights_file(source, "sak export --from")))
    kept = {k: v.contiguous() for k, v in state.items() if not k.startswith(DISTILL_ONLY)}
    out.mkdir(parents=True, exist_ok=True)
    save_file(kept, str(out / "student.safetensors"), metadata={"format": "pt", "producer": "sak"})
    config = {
        "student": {**recipe.to_dict()["student"], "pretrained": None},
        "tasks": [{"name": t.name, "channels": create_task(t.name, t.channels).channels} for t in recipe.tasks],
        "teachers": [{"id": t.id, "adapter": t.adapter} for t in recipe.teachers],
        "image_size": recipe.data.image_size,
    }
    (out / "student.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def load_exported(path: Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild an exported student (eval mode) and return it with its config."""
    from ..registry import STUDENTS

    config = yaml.safe_load((path / "student.yaml").read_text())
    s = structure(StudentConfig, config["student"], "student")
    tasks = [structure(TaskConfig, t, "tasks") for t in config["tasks"]]
    stem = TeacherAgnosticStem(s.model, config["image_size"], None, **s.model_kwargs)
    n_levels = len(s.levels) if s.levels else min(4, stem.depth)
    # widths equal to the stem's: no aligners are built (they are distillation-only and not exported)
    cls = STUDENTS.get(s.architecture)
    keeps_paths = getattr(cls, "inference_uses_teacher_paths", True)  # many_to_one: projections are dropped
    slots = [TeacherSlot(t["id"], (stem.dim,) * n_levels, t["adapter"]) for t in config["teachers"] if keeps_paths]
    s.aligner = "auto"
    model = cls.from_config(stem, slots, {t.name: t.channels for t in tasks}, s)
    if s.lora:
        model.stem.add_lora(s.lora)
    model.load_state_dict(load_file(str(path / "student.safetensors")), strict=True)
    return model.eval(), config


def save_prediction(task: str, pred: torch.Tensor, out: Path, image_id: str) -> Path:
    """One image's prediction in the standard per-task format (the format `sak eval-preds` reads; see
    sak/engine/predictions.py): semseg/parts PNG of class indices; saliency and edges PNG 0-255; normals
    RGB PNG with n = 2 v / 255 - 1; depth .npy in metres."""
    return save_encoded(out, task, image_id, encode(task, pred))


@torch.no_grad()
def predict_images(model: torch.nn.Module, config: dict, images: list[Path], out: Path) -> list[Path]:
    """Run the student on image files at its trained size and write each task's output at the
    image's original size."""
    size = config["image_size"]
    if not config["tasks"]:
        raise ValueError(
            "the exported student has no task heads (its recipe has no tasks: a stage-1 distillation, which trains "
            "features only), so there is nothing to predict; export the stage-2 run trained from it"
        )
    tasks = {t["name"]: create_task(t["name"], t["channels"]) for t in config["tasks"]}
    by_stem: dict[str, Path] = {}
    for file in map(Path, images):  # outputs are named by file name: two inputs must not share one
        if by_stem.setdefault(file.stem, file) != file:
            raise ValueError(
                f"{by_stem[file.stem]} and {file} would both write {file.stem}.png per task; predict them into "
                "separate --out folders"
            )
    written = []
    for file in images:
        try:
            rgb = decode_rgb(file)  # the training data's decoding: EXIF orientation, 16-bit, transparency
        except DataError as exc:
            raise ValueError(f"cannot read image: {exc}") from exc
        x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None]
        h, w = x.shape[-2:]
        resized = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True).round().to(torch.uint8)
        logits = model(resized, with_features=False).tasks
        for name, task in tasks.items():
            full = F.interpolate(logits[name].float(), size=(h, w), mode="bilinear", align_corners=False)
            written.append(save_prediction(name, task.predict(full)[0], out, Path(file).stem))
    return written
