"""Pictures of what a student learnt and what it predicts.

- `sak viz features RECIPE --checkpoint C --out grid.png`: held-out images, and for each teacher its features
  beside the student's features for it, both projected onto the teacher's top three principal components
  (one basis per teacher, so that matching colours mean matching feature directions). `make demo` draws its
  report's features.png so.
- `sak viz preds PREDS --out DIR [--image-folder FOLDER]`: saved predictions (`<task>/<id>.png|.npy`, as `sak predict`
  and `sak eval --save-preds` write them) in colour through each task's `Task.visualize`, one file per task
  and sample, and one panel per sample (its image, when given, then its tasks left to right).

Every picture is written to a temporary file renamed over its name: a kill never leaves a cut-off PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import Recipe
from ..data.images import IMAGE_EXTENSIONS, decode_rgb
from ..files import write_whole
from ..tasks import create_task
from ..teachers.weights import first_misfit
from .predictions import SUFFIX, PredictionError, read_prediction

GAP = 4  # white pixels between a panel's pictures


def pca_rgb(reference: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Project (N, C, h, w) maps onto the top 3 principal components of `reference` (one basis for
    all, so that matching colours mean matching feature directions); each map's colours are then
    stretched over its own 1-99% range, since a student's maps are usually weaker in amplitude."""
    flat = reference.permute(0, 2, 3, 1).reshape(-1, reference.shape[1]).double()
    mean = flat.mean(0)
    # exact, from the C x C covariance (torch.pca_lowrank draws a random projection: its components were rough
    # and their signs, so the colours, followed the global RNG); each component's largest weight positive
    _, vectors = torch.linalg.eigh((flat - mean).T @ (flat - mean))
    v = vectors[:, -min(3, *flat.shape) :].flip(1)  # (C, q), largest variance first
    v = (v * torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))).float()
    mean = mean.float()
    out = []
    for x in (reference, *others):
        p = (x.permute(0, 2, 3, 1).float() - mean) @ v  # (N, h, w, q)
        if p.shape[-1] < 3:  # fewer than three components (a map of 1 or 2 channels, or a single pixel)
            p = torch.cat([p, p.new_zeros(*p.shape[:-1], 3 - p.shape[-1])], dim=-1)
        lo, hi = p.reshape(-1, 3).quantile(0.01, dim=0), p.reshape(-1, 3).quantile(0.99, dim=0)
        out.append(((p - lo) / (hi - lo + 1e-8)).clamp(0, 1))
    return out


def save_png(array: np.ndarray, path: Path) -> Path:
    return write_whole(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"), sync=False)


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """A matplotlib figure to the PNG `path` (written whole), then closed."""
    import matplotlib.pyplot as plt

    try:
        return write_whole(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"), sync=False)
    finally:
        plt.close(fig)


def load_student_for_features(recipe: Recipe, checkpoint: Path, teachers, tasks):
    """The recipe's whole student (aligners included) with the weights of a run, checkpoint or .safetensors
    file, and its target normalisers (`loss.normalize`) with the statistics saved beside them (or None)."""
    from .build import build_student, build_target_normalizers
    from .checkpoint import read_weights
    from .init import student_weights_file

    if (checkpoint / "student.yaml").is_file():
        raise ValueError(
            f"--checkpoint {str(checkpoint)!r} is an export (sak export), which keeps no aligners, the part of the "
            "student that predicts each teacher's features: give the run or checkpoint directory it was exported from"
        )
    file = student_weights_file(checkpoint, "--checkpoint")
    state = read_weights(file, "--checkpoint")
    student = build_student(recipe, teachers, tasks)
    try:
        student.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"--checkpoint {str(file)!r}: the weights do not make the recipe's student ({first_misfit(exc)}); "
            "draw with the recipe that trained them: the run directory's recipe.yaml holds it"
        ) from exc
    normalizers = build_target_normalizers(recipe, teachers)
    if normalizers is not None:  # the student learnt normalised targets: its features are mapped back with these
        stats = file.parent / "target_normalizers.safetensors"
        if not stats.is_file():
            raise FileNotFoundError(
                f"{stats}: not found; the recipe has loss.normalize {recipe.loss.normalize!r}, so the student predicts "
                "normalised features, and the statistics saved beside its weights map them back to the teachers'"
            )
        normalizers.load_state_dict(read_weights(stats, "--checkpoint"))
    return student.eval(), normalizers


MAX_FEATURE_ROWS = 64


@torch.no_grad()
def feature_grid(
    recipe: Recipe, checkpoint: Path, out: Path, images: int = 4, split: str | None = None, level: int = -1
) -> Path:
    """Draw `images` images of `split` (default: the recipe's eval.split) with, for each teacher, its features
    at `level` (an index into its levels; -1 the last) and the student's for it, to the PNG `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from accelerate.utils import set_seed

    from .build import build_loader, build_tasks, build_teachers
    from .step import teacher_targets

    if not 1 <= images <= MAX_FEATURE_ROWS:  # (one batch through every teacher; a figure matplotlib can save)
        raise ValueError(f"--images {images}: draw 1 to {MAX_FEATURE_ROWS} images (one row each, in one batch)")
    set_seed(recipe.run.seed)  # as the trainer does before building them: teachers of random weights are its own
    teachers = build_teachers(recipe, torch.device("cpu"))
    levels = {tid: len(t.level_dims) for tid, t in teachers.items()}
    if not all(-n <= level < n for n in levels.values()):
        raise ValueError(f"--level {level}: the teachers have {levels} levels; give an index in -{min(levels.values())}"
                         f"..{min(levels.values()) - 1} (-1: the last)")  # fmt: skip
    student, normalizers = load_student_for_features(recipe, checkpoint, teachers, build_tasks(recipe))
    batch = next(iter(build_loader(recipe, split or recipe.eval.split, train=False, batch_size=images)))
    if len(batch["image"]) < images:  # (drawn silently before)
        print(f"note: split {split or recipe.eval.split!r} has {len(batch['image'])} image(s); drawing them all, "
              f"not the {images} asked")  # fmt: skip
    images = len(batch["image"])
    features = student(batch["image"]).features
    if normalizers is not None:
        features = normalizers.denormalize(features)
    targets = teacher_targets(teachers, batch["image"], None)
    cols = 1 + 2 * len(teachers)
    fig, axes = plt.subplots(images, cols, figsize=(2.2 * cols, 2.2 * images), squeeze=False)
    for c, tid in enumerate(teachers):
        t_map = targets[tid].levels[level]
        s_map = torch.nn.functional.interpolate(features[tid][level].float(), size=t_map.shape[-2:], mode="bilinear")
        t_rgb, s_rgb = pca_rgb(t_map, s_map)
        for r in range(images):
            axes[r, 1 + 2 * c].imshow(t_rgb[r].numpy())
            axes[r, 2 + 2 * c].imshow(s_rgb[r].numpy())
        axes[0, 1 + 2 * c].set_title(f"{tid}\nteacher", fontsize=8)
        axes[0, 2 + 2 * c].set_title(f"{tid}\nstudent", fontsize=8)
    for r in range(images):
        axes[r, 0].imshow(batch["image"][r].permute(1, 2, 0).numpy())
    axes[0, 0].set_title("held-out image", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, out)


def _find_image(folder: Path, sample_id: str) -> Path:
    for suffix in IMAGE_EXTENSIONS:
        for name in (sample_id + suffix, sample_id + suffix.upper()):
            if (folder / name).is_file():
                return folder / name
    raise PredictionError(f"{folder}: no image {sample_id}.* ({', '.join(IMAGE_EXTENSIONS)}) for the prediction "
                          f"{sample_id}; --image-folder names the folder of the predicted images")  # fmt: skip


def colour_predictions(
    preds: Path, out: Path, images: Path | None = None, tasks: list[str] | None = None
) -> tuple[list[str], list[Path]]:
    """Write `out/<task>/<id>.png` (each prediction in colour) and `out/panels/<id>.png`: the image from `images`
    when given, then the sample's predictions of `tasks` (default: every task folder under `preds`, in the order
    of SUFFIX: semseg, parts, saliency, edges, normals, depth) left to right, grey where a task has no prediction
    of the sample. Returns the panels' columns and files."""
    if not preds.is_dir():
        raise PredictionError(f"{preds}: {'is a file, not' if preds.exists() else 'there is no'} folder of predictions")
    if images is not None and not images.is_dir():
        raise PredictionError(f"--image-folder {images}: not a folder of images")
    if tasks:
        unknown = [t for t in tasks if t not in SUFFIX]
        if unknown:
            raise PredictionError(f"--tasks: no prediction format for {unknown}; known: {sorted(SUFFIX)}")
    else:
        tasks = [t for t in SUFFIX if (preds / t).is_dir()]
        if not tasks:
            raise PredictionError(f"{preds}: no folder of predictions of any task ({', '.join(SUFFIX)})")
    if out.resolve() == preds.resolve():  # out/<task>/<id>.png would be each prediction's own file
        raise PredictionError(f"--out {out}: the folder of the predictions, whose files the pictures would replace; "
                              "give another folder")  # fmt: skip
    inside = next((t for t in SUFFIX if out.resolve().is_relative_to((preds / t).resolve())), None)
    if inside is not None:  # (a task's folder is read recursively: the pictures were read as its predictions later)
        raise PredictionError(f"--out {out}: inside {preds / inside}, whose files are read as {inside} predictions; "
                              "give a folder outside the predictions' task folders")  # fmt: skip
    # ids as `sak predict` / `sak eval --save-preds` name the files: relative paths (a folder dataset's ids hold `/`)
    ids = {
        t: {
            p.relative_to(preds / t).with_suffix("").as_posix()
            for p in (preds / t).rglob(f"*{SUFFIX[t]}")
            if not (p.name.startswith(".") and ".partial" in p.name)  # (a write `sak predict` had not renamed)
        }
        for t in tasks
    }  # (sets: a split's 5,000 ids per task are looked up once per sample)
    if not any(ids.values()):
        raise PredictionError(f"{preds}: no prediction files in {', '.join(t + '/' for t in tasks)}")
    drawers = {t: create_task(t) for t in tasks}
    columns, panels = ["image"] * (images is not None) + tasks, []
    for sample_id in sorted(set().union(*ids.values())):
        pictures = {}
        if images is not None:
            pictures["image"] = decode_rgb(_find_image(images, sample_id))
        for t in tasks:
            if sample_id in ids[t]:
                pictures[t] = drawers[t].visualize(read_prediction(preds, t, sample_id))
                save_png(pictures[t], out / t / f"{sample_id}.png")
        sizes = {p.shape[:2] for p in pictures.values()}
        if len(sizes) > 1:
            shapes = ", ".join(f"{k} {p.shape[0]}x{p.shape[1]}" for k, p in pictures.items())
            raise PredictionError(f"{sample_id}: the image and its predictions differ in size ({shapes}); predictions "
                                  "are at the size of their image, as sak predict and sak eval write them")  # fmt: skip
        (h, w) = sizes.pop()
        blank = np.full((h, w, 3), 128, np.uint8)  # a task without this sample's prediction: its column kept grey
        gap = np.full((h, GAP, 3), 255, np.uint8)
        row = [x for c in columns for x in (pictures.get(c, blank), gap)][:-1]
        panels.append(save_png(np.concatenate(row, axis=1), out / "panels" / f"{sample_id}.png"))
    return columns, panels


def add_viz_command(sub) -> None:
    """`sak viz features RECIPE ...` and `sak viz preds DIR ...` (sak/cli.py adds it to its commands)."""
    p = sub.add_parser("viz", help="draw a student's features beside its teachers' (features RECIPE --checkpoint C), "
                                   "or saved predictions in colour (preds DIR)")  # fmt: skip
    p.add_argument("action", choices=["features", "preds"])
    p.add_argument("source", metavar="RECIPE_OR_PREDS", help="features: the recipe; preds: the folder of predictions")
    p.add_argument("overrides", nargs="*", default=[], help="features: key.path=value")
    p.add_argument("--out", required=True, help="features: the PNG to write; preds: the folder to write")
    p.add_argument("--checkpoint", default=None, help="features: run directory, checkpoint directory or .safetensors")
    p.add_argument("--split", default=None, help="features: the split to draw from (default: the recipe's eval.split)")
    p.add_argument("--images", type=int, default=None, help="features: how many images (rows), default 4")
    p.add_argument(
        "--level", type=int, default=None, help="features: which level of the teachers (default -1, the last)"
    )
    p.add_argument("--image-folder", default=None,
                   help="preds: the folder of the predicted images (<id>.jpg|png...), drawn first in each panel")  # fmt: skip
    p.add_argument("--tasks", default=None, help="preds: comma-separated (default: every task folder found)")
    p.set_defaults(func=viz_main)


def viz_main(args) -> int:
    from ..config import load_recipe

    flags = {"--checkpoint": args.checkpoint, "--split": args.split, "--images": args.images, "--level": args.level,
             "--image-folder": args.image_folder, "--tasks": args.tasks}  # fmt: skip
    others = (
        ("--image-folder", "--tasks")
        if args.action == "features"
        else ("--checkpoint", "--split", "--images", "--level")
    )
    wrong = [flag for flag in others if flags[flag] is not None] + (args.overrides if args.action == "preds" else [])
    if wrong:
        other = "preds" if args.action == "features" else "features"
        raise ValueError(f"sak viz {args.action} does not take {' '.join(wrong)}: {'they are' if len(wrong) > 1 else 'it is'} "
                         f"for sak viz {other}")  # fmt: skip
    out = Path(args.out)
    if args.action == "features":
        if args.checkpoint is None:
            raise ValueError("sak viz features needs --checkpoint: the run, checkpoint directory or .safetensors file")
        if out.is_dir():  # (found after the teachers are built, else)
            raise ValueError(f"--out {out}: a folder; give the PNG's file name (e.g. {out / 'features.png'})")
        if out.suffix.lower() != ".png":  # (PNG bytes were written under any name, a .jpg among them)
            raise ValueError(f"--out {out}: sak viz features writes a PNG; give a file name ending in .png")
        above = next(p for p in out.absolute().parents if p.exists())
        if not above.is_dir():
            raise ValueError(f"--out {out}: {above} is a file, so no folder can be made there")
        recipe = load_recipe(args.source, args.overrides)
        images, level = 4 if args.images is None else args.images, -1 if args.level is None else args.level
        print(f"wrote {feature_grid(recipe, Path(args.checkpoint), out, images, args.split, level)}")
        return 0
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file; sak viz preds writes a folder of pictures there")
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    image_folder = Path(args.image_folder) if args.image_folder else None
    columns, panels = colour_predictions(Path(args.source), out, image_folder, tasks)
    print(f"wrote {len(panels)} panel(s) under {out / 'panels'}/ ({' | '.join(columns)}) and each task's pictures "
          f"in {out}/<task>/")  # fmt: skip
    return 0


__all__ = ["add_viz_command", "colour_predictions", "feature_grid", "pca_rgb", "save_figure", "save_png", "viz_main"]
