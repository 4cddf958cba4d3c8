"""Export a trained student for inference (no teachers, no aligners) and predict on images.

An export directory holds `student.safetensors` and `student.yaml` (the recipe's plug-in imports, the
student section of the recipe, the tasks with their channels, the teacher ids whose adapter paths the
student keeps, the input size, and the evaluation canvas `sak predict` centres photographs in). `load_exported`
rebuilds the model from those two files alone.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..config import Recipe, StudentConfig, TaskConfig, structure
from ..data import SakDataset
from ..data.images import DataError, decode_rgb
from ..data.transforms import IMAGENET_MEAN_UINT8, pad, unpad
from ..digest import sha256_of
from ..files import discard, refuse_dangling_link, save_safetensors, writing
from ..student import TeacherAgnosticStem, TeacherSlot
from ..tasks import create_task
from ..teachers.weights import is_timm_file
from .checkpoint import first_misfit, refuse_changed
from .fit import check_canvas
from .init import student_weights_file
from .predictions import SUFFIX, PredictionError, encode, prediction_path, save_encoded

DISTILL_ONLY = ("aligners.", "projections.")


class ExportError(ValueError):
    """Weights that do not make the student a recipe (or an export's student.yaml) describes."""


def export_config(recipe: Recipe) -> dict:
    """What student.yaml holds: the recipe's student section, tasks with channels, teacher ids, input size, and
    the canvas (with its fill colour) that `sak predict` centres photographs in: the dataset's evaluation one."""
    from ..config import build_options
    from ..registry import DATASETS

    dataset = DATASETS.get(recipe.data.name)
    # a plug-in dataset not derived from SakDataset takes SakDataset's default (the square training size)
    canvas_of = getattr(dataset, "prediction_canvas", SakDataset.prediction_canvas)
    canvas, fill = canvas_of(recipe.data.image_size, build_options(dataset, recipe.data.options, "data"))
    student = {**recipe.to_dict()["student"], "pretrained": None}
    tag = recipe.student.pretrained
    if tag is not None and not is_timm_file(tag):  # the tag's timm config (its mean / std), without its download
        student["model"] = f"{recipe.student.model.split('.')[0]}.{tag}"
    return {
        "imports": list(recipe.imports),  # plug-in modules (an adapter type, say) that rebuilding needs
        "student": student,
        "tasks": [{"name": t.name, "channels": create_task(t.name, t.channels).channels} for t in recipe.tasks],
        "teachers": [{"id": t.id, "adapter": t.adapter} for t in recipe.teachers],
        "image_size": recipe.data.image_size,
        "canvas": list(canvas),
        "image_fill": list(fill),
        "mixed": recipe.precision.mixed,  # `sak eval` autocasts the student so; `sak predict` does too (bf16)
    }


def inference_state(source: Path, what: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file of a run, checkpoint or .safetensors (`what` names the flag in errors) and its tensors
    without the distillation-only ones."""
    file = student_weights_file(source, what)
    refuse_changed(file, what, ExportError)  # (a checkpoint's sha256, written with it)
    if file.name == "student.safetensors" and (file.parent / "student.yaml").is_file():
        exported_config(file.parent)  # an export exported again: its weights as student.yaml's sha256 says
    try:
        state = load_file(str(file))
    except SafetensorError as exc:
        raise ExportError(f"{what} {str(file)!r}: damaged or not a safetensors file ({exc})") from exc
    return file, {k: v.contiguous() for k, v in state.items() if not k.startswith(DISTILL_ONLY)}


def build_exported(config: dict, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The inference student that `config` (student.yaml) describes, with `state` loaded strictly (eval mode).
    A RuntimeError from load_state_dict if the weights are another student's."""
    from ..config import import_plugins
    from ..registry import STUDENTS

    import_plugins(config.get("imports") or [], where="student.yaml imports")
    s = structure(StudentConfig, config["student"], "student")
    tasks = [structure(TaskConfig, t, "tasks") for t in config["tasks"]]
    from .build import stem_input_size

    stem = TeacherAgnosticStem(
        s.model, stem_input_size(s, config["image_size"]), None, s.normalization, **s.model_kwargs
    )
    n_levels = len(s.levels) if s.levels else min(4, stem.depth)
    # widths equal to the stem's: no aligners are built (they are distillation-only and not exported)
    cls = STUDENTS.get(s.architecture)
    keeps_paths = getattr(cls, "inference_uses_teacher_paths", True)  # many_to_one: projections are dropped
    slots = [TeacherSlot(t["id"], (stem.dim,) * n_levels, t["adapter"]) for t in config["teachers"] if keeps_paths]
    s.aligner = "auto"
    model = cls.from_config(stem, slots, {t.name: t.channels for t in tasks}, s)
    if s.lora:
        model.stem.add_lora(s.lora)
    model.load_state_dict(state, strict=True)
    return model.eval()


def export_student(recipe: Recipe, source: Path, out: Path, what: str = "sak export --from") -> Path:
    """Write the inference student of a run (or checkpoint) to `out`, after checking that its weights make the
    recipe's student (a refused export leaves `out` as it was). Both files are written beside `out` and then
    renamed into it, the weights first, so that a crash while writing them leaves an earlier export whole; a
    crash between the two renames leaves new weights beside the earlier student.yaml, whose weights digest
    (`weights_sha256`) `load_exported` then finds does not match."""
    # the run directory itself (`sak eval --checkpoint RUN` would read the export there, not the run's later
    # checkpoints) or its checkpoints (pruning deletes a checkpoint with what is in it)
    where = out.resolve()
    run = any((where / "checkpoints").glob("step_*/trainer_state.json"))
    kept = next(
        (p for p in (where, *where.parents) if p.name == "checkpoints" and any(p.glob("step_*/trainer_state.json"))),
        None,
    )
    refuse_dangling_link(out, "--out")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: a file; an export is a folder (student.safetensors and student.yaml)")
    if run or kept is not None:
        raise ExportError(f"--out {out}: {'a run directory' if run else f'inside the checkpoints {kept}'}, where "
                          "`sak eval` and pruning would take the export for (part of) a checkpoint; export beside it")  # fmt: skip
    file, state = inference_state(source, what)  # (`what` names where `source` came from, in errors)
    config = export_config(recipe)
    try:
        model = build_exported(config, state)
    except RuntimeError as exc:
        raise ExportError(
            f"{str(file)!r}: the weights do not make the recipe's student ({first_misfit(exc)}); export with the "
            "recipe that trained them: the run directory's recipe.yaml holds it, overrides included"
        ) from exc
    if config["tasks"]:  # `sak predict` runs in this canvas (a stage-1 export predicts nothing)
        check_canvas(model, tuple(config["canvas"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    where = Path(os.path.abspath(out))  # (`--out .` has no name to put beside it)
    remove_stale_partials(where)
    tmp = partial_folder(where)
    tmp.mkdir()
    try:
        with writing(out):
            weights = tmp / "student.safetensors"
            save_safetensors(state, weights, {"format": "pt", "producer": "sak"})  # (not 0600: as_umask_allows)
            config["weights_sha256"] = sha256_of(weights)
            (tmp / "student.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            out.mkdir(exist_ok=True)
            for name in ("student.safetensors", "student.yaml"):
                os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def partial_folder(out: Path) -> Path:
    """Where this process writes an export before renaming its files into `out`: beside it, named after the
    process and host, so that two exports never share one and a later one can tell a killed writer's."""
    return out.with_name(f".{out.name}.{os.getpid()}@{socket.gethostname()}.partial")


def remove_stale_partials(out: Path) -> None:
    """Delete the folders that exports into `out` killed on this host left (kill -9, a lost machine: no clean-up
    ran), a student's weights each; those of live processes, or of other hosts, which this one cannot tell, stay.
    One with this process's own id is a killed one's too (a container restarted with the same pid and host name):
    a process runs one export at a time."""
    host = socket.gethostname()
    for folder in out.parent.glob(f".{glob.escape(out.name)}.*@{glob.escape(host)}.partial"):
        pid = folder.name[len(out.name) + 2 : -len(f"@{host}.partial")]
        if pid.isdigit() and (int(pid) == os.getpid() or not process_alive(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_exported(path: Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild an exported student (eval mode) and return it with its config."""
    config = exported_config(path)
    weights = path / "student.safetensors"
    try:
        return build_exported(config, load_file(str(weights))), config
    except RuntimeError as exc:
        raise ExportError(f"{str(path)!r}: student.safetensors does not make the student of student.yaml "
                          f"({first_misfit(exc)})") from exc  # fmt: skip
    except SafetensorError as exc:
        raise ExportError(f"{str(weights)!r} is damaged or not a safetensors file ({exc}); export again") from exc


def exported_config(path: Path) -> dict:
    """An export directory's student.yaml, checked: readable, and its weights those it was exported with."""
    files = [path / "student.yaml", path / "student.safetensors"]
    if not all(f.is_file() for f in files):
        raise FileNotFoundError(
            f"{str(path)!r} is not an export directory: `sak export` writes student.yaml and student.safetensors "
            f"there (missing: {', '.join(f.name for f in files if not f.is_file())})"
        )
    try:
        config = yaml.safe_load(files[0].read_text())
        if not isinstance(config, dict):
            raise ValueError(f"a YAML {type(config).__name__}, not a mapping")
        missing = [k for k in ("student", "tasks", "teachers", "image_size") if k not in config]
        if missing:  # (else a bare KeyError: 'tasks' while building)
            raise ValueError(f"it has no {', '.join(repr(k) for k in missing)}")
    except (yaml.YAMLError, ValueError) as exc:
        raise ExportError(f"{str(files[0])!r} is not an export's student.yaml ({exc}); export again") from exc
    digest = config.get("weights_sha256")  # (exports before sak wrote it have none)
    if digest is not None and sha256_of(files[1]) != digest:
        raise ExportError(
            f"{str(files[1])!r} is not the weights {files[0].name} was exported with (their sha256 differs: an "
            "export interrupted between writing the two, or a file replaced by hand); export again"
        )
    return config


def fit_within(size: tuple[int, int], canvas: tuple[int, int]) -> tuple[tuple[int, int], float]:
    """`size` scaled down, aspect kept, to fit inside `canvas` (unchanged if it fits already), and the factor:
    depth is unscaled by the factor itself, as training divides it by its draw (`resize_sample`), not by the
    ratio of rounded sides."""
    scale = min(1.0, canvas[0] / size[0], canvas[1] / size[1])
    if scale == 1.0:
        return (size[0], size[1]), 1.0
    return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))), scale


def resolve_device(name: str) -> torch.device:
    """`--device`: a torch device this machine has (auto: the first CUDA GPU, else the CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s); use cpu")
    return dev


@torch.no_grad()
def predict_images(
    model: torch.nn.Module, config: dict, images: list[Path], out: Path, device: str | torch.device = "cpu"
) -> list[Path]:
    """Run the student on image files as `sak eval` runs it on a dataset's images: each photograph centred,
    at its own resolution, in the evaluation canvas recorded in student.yaml (filled with the recorded colour),
    and the padding cut from the predictions. A photograph larger than the canvas is first resized to fit it
    (aspect kept), and its predictions back to its size. Exports written before sak recorded the canvas use
    the square training size and the ImageNet mean colour. `device`: where the student runs (moved there)."""
    if not config["tasks"]:
        raise ValueError(
            "the exported student has no task heads (its recipe has no tasks: a stage-1 distillation, which trains "
            "features only), so there is nothing to predict; export the stage-2 run trained from it"
        )
    canvas = tuple(config.get("canvas") or (config["image_size"],) * 2)
    fill = tuple(config.get("image_fill") or IMAGENET_MEAN_UINT8)
    check_canvas(model, canvas)
    # the recipe's precision.mixed, recorded since 2026-11-28 (earlier exports: float32), autocast as `sak eval`
    # does. fp16 autocasting is for GPUs (training refuses it elsewhere): on the CPU such students run in float32
    device = torch.device(device)
    mixed = {"bf16": torch.bfloat16, "fp16": torch.float16 if device.type == "cuda" else None}.get(config.get("mixed"))
    model.to(device)
    tasks = {t["name"]: create_task(t["name"], t["channels"]) for t in config["tasks"]}
    formatless = [name for name in tasks if name not in SUFFIX]
    if formatless and len(formatless) == len(tasks):  # plug-in tasks only: before the first image is run
        raise ValueError(f"the exported student predicts {formatless}, which have no prediction file format (sak "
                         f"predict writes {', '.join(SUFFIX)}); run such a task's head from Python")  # fmt: skip
    if formatless:  # the others are written (the whole student was refused before); (3: past no_grad's wrapper)
        warnings.warn(f"sak predict: {formatless} have no prediction file format (sak predict writes "
                      f"{', '.join(SUFFIX)}): not written; run their heads from Python", stacklevel=3)  # fmt: skip
        tasks = {name: task for name, task in tasks.items() if name in SUFFIX}
    folders = [str(f) for f in map(Path, images) if f.is_dir()]
    if folders:
        raise ValueError(
            f"{', '.join(folders[:3])}: a folder, not an image file; give the images (e.g. {folders[0]}/*.jpg)"
        )
    missing = [str(f) for f in map(Path, images) if not f.is_file()]
    if missing:  # before anything is written
        raise ValueError(f"image file(s) not found, nothing predicted: {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))  # fmt: skip
    # one file given twice (a glob and its name, say): predicted once, its files counted once
    unique: dict[Path, Path] = {}
    for f in map(Path, images):
        unique.setdefault(f.resolve(), f)
    images = list(unique.values())
    by_stem: dict[str, Path] = {}
    for file in map(Path, images):  # outputs are named by file name: two inputs must not share one
        # (nor two names differing in case only: one file on a case-insensitive disk, macOS's or Windows')
        if by_stem.setdefault(file.stem.casefold(), file) != file:
            other = by_stem[file.stem.casefold()]
            raise ValueError(
                f"{other} and {file} would both write <task>/{other.stem}.png (.npy for depth) per task"
                + (" on a disk that ignores case" if other.stem != file.stem else "")
                + "; predict them into separate --out folders"
            )
        # an image inside --out: what would be written beside it may be its dataset's own files (NYUD-v2's depth/
        # and normals/ beside images/), or the image itself (an input in --out/semseg/), which were replaced
        if file.resolve().is_relative_to(out.resolve()):
            there = next((p for t in tasks if (p := prediction_path(out, t, file.stem)).exists()), None)
            if there is not None:
                raise ValueError(f"--out {out} holds the input {file}, and {there} is there already: it may be a "
                                 "dataset's own file or the image itself, which the prediction would replace; give "
                                 "a folder outside the images' own")  # fmt: skip
    written = []
    for done, file in enumerate(map(Path, images)):
        try:
            rgb = decode_rgb(file)  # the training data's decoding: EXIF orientation, 16-bit, transparency
        except DataError as exc:  # (decoding every image first would hold them all, or decode each twice)
            before = f"; the {done} image(s) before it were predicted into {out}/" if done else "; nothing was written"
            raise ValueError(f"cannot read image: {exc}{before}") from exc
        size = rgb.shape[:2]
        fit, scale = fit_within(size, canvas)
        if fit != size:
            x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float()
            x = F.interpolate(x, size=fit, mode="bilinear", antialias=True).round().clamp(0, 255).to(torch.uint8)
            rgb = x[0].permute(1, 2, 0).numpy()
        padded = pad({"image": rgb}, canvas, fill)["image"]  # (H, W, 3) uint8, as the evaluation pads
        image = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))[None].to(device)
        with torch.autocast(device.type, dtype=mixed, enabled=mixed is not None):
            logits = model(image, with_features=False)
        arrays = {}
        for name, task in tasks.items():
            task_logits = logits.tasks[name].float()
            if fit == size:  # as sak eval: the prediction on the canvas, its padding cut
                pred = unpad(task.predict(task_logits)[0], fit)
            else:  # resized back to the photograph's size, in its terms (depth: as if seen from its distance)
                pred = task.predict(F.interpolate(unpad(task_logits, fit), size=size, mode="bilinear"))[0]
                pred = task.unscale(pred, scale)
            try:  # every task's file made before any is written: an image has all its files or none
                arrays[name] = encode(name, pred)
            except PredictionError as exc:  # (a NaN / inf output)
                earlier = f"; the {done} image(s) before it were predicted into {out}/" if done else ""
                raise PredictionError(f"{file}: {exc}; none of its files was written{earlier}") from exc
        saved = []
        try:
            for name, array in arrays.items():
                saved.append(save_encoded(out, name, file.stem, array))
        except OSError as exc:  # a full disk: this image's files taken back, so that it has all of them or none
            for name in arrays:  # (an earlier prediction's files of the tasks not yet written included)
                discard(prediction_path(out, name, file.stem))
            earlier = f"; the {done} image(s) before it were predicted into {out}/" if done else ""
            message = f"{exc.strerror or exc}; none of {file}'s files was kept{earlier}"
            raise (OSError(message) if exc.errno is None else OSError(exc.errno, message)) from exc
        written += saved
    return written
