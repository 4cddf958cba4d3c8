"""Shared code of the dense benchmarks (benchmarks/pascal_context.py, benchmarks/nyud.py): evaluate
checkpoints or prediction folders with `sak.engine.task_eval`, write JSON, a markdown table in the layout
of SAK's Table 5 / Table 6 with the published rows beside ours, and a picture (image | ground truth |
prediction for every task). `--fixture` makes the whole thing run on a fresh machine in about 10 s (a minute
on a busy machine): it writes the fixture dataset, trains a tiny student for a few steps and benchmarks that
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sak.config import load_recipe
from sak.engine.task_eval import DATASET_TASKS, NUM_CLASSES, evaluate_student, load_reference, score_prediction_dir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# (task, column title) in the order of the published tables
COLUMNS = {
    "pascal_context": [("semseg", "semseg mIoU"), ("parts", "parts mIoU"), ("saliency", "sal maxF"),
                       ("normals", "normals mErr"), ("edges", "bound odsF")],
    "nyud": [("semseg", "semseg mIoU"), ("depth", "depth RMSE"), ("normals", "normals mErr"), ("edges", "bound odsF")],
}  # fmt: skip
TITLES = {"pascal_context": "PASCAL-Context (SAK Table 5 layout)", "nyud": "NYUD-v2 (SAK Table 6 layout)"}
FIXTURE_NOTE = (
    "**Pipeline check, not a result.** These rows are a tiny randomly initialised student trained for a few "
    "steps on the synthetic fixture dataset (`sak.data.fixtures`, a handful of generated images in the real "
    "on-disk format). They show that training, prediction files and the published metric definitions run end "
    "to end; the numbers are not comparable with the published rows."
)
# A tiny stage-2 recipe on the fixture: the style of tests/tiny_multitask.yaml with the dataset's own tasks.
FIXTURE_RECIPE = """
run: {{name: {dataset}_fixture, output_dir: {out}, seed: 0, stage: multitask}}
teachers:
  - name: timm
    key: vit_a
    options: {{model: vit_small_patch14_dinov2, model_kwargs: {{embed_dim: 48, depth: 4, num_heads: 2, img_size: 56}}}}
student:
  model: vit_small_patch16_224
  model_kwargs: {{embed_dim: 32, depth: 4, num_heads: 2, dynamic_img_size: true}}
tasks: {tasks}
data: {{name: {dataset}, root: {root}, image_size: 64, batch_size: 4, options: {{eval_size: [48, 64]}}}}
eval: {{batch_size: 4}}
optim: {{lr: 2.0e-3, weight_decay: 1.0e-6, grad_clip: 10.0}}
schedule: {{name: poly, max_steps: {steps}, warmup_steps: 0, power: 0.9}}
checkpoint: {{keep_last: 1}}
logging: {{every: 10, progress: false, wandb: {{mode: disabled}}}}
"""


@dataclass
class Model:
    """One row of ours: a checkpoint (with its recipe) or a folder of prediction files."""

    kind: str  # "checkpoint" | "preds"
    path: Path
    name: str | None = None


class _AddModel(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None) -> None:
        kind = "checkpoint" if option_string == "--checkpoint" else "preds"
        namespace.models = [*(namespace.models or []), Model(kind, Path(value))]


class _NameModel(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None) -> None:
        if not namespace.models:
            parser.error("--name names the --checkpoint or --preds given before it")
        namespace.models[-1].name = value


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
def find_recipe(checkpoint: Path) -> Path:
    """The recipe.yaml that training wrote next to the checkpoint (checkpoint dir, or run dir)."""
    for folder in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if (folder / "recipe.yaml").is_file():
            return folder / "recipe.yaml"
    raise SystemExit(f"{checkpoint}: no recipe.yaml next to it; give the recipe with --recipe")


def reference(args: argparse.Namespace) -> dict[str, float] | None:
    """--reference's single-task scores for delta_m (e.g. ViT-B baselines for ViT-B students), or None for the
    published single-task row (ViT-L)."""
    return load_reference(args.reference) if args.reference else None


def evaluate_model(model: Model, dataset: str, args: argparse.Namespace, preds_dir: Path) -> dict:
    """Score one model; a checkpoint's predictions are saved to `preds_dir` (for the picture)."""
    if model.kind == "preds":
        if not args.root:
            raise SystemExit("--preds needs --root (the dataset folder holding the ground truth)")
        options = {"eval_size": list(args.eval_size)} if args.eval_size else None
        result = score_prediction_dir(
            dataset,
            args.root,
            args.split,
            model.path,
            reference=reference(args),
            options=options,
            progress=not args.quiet,
        )
        result["preds_dir"] = str(model.path)
        return result
    recipe_path = Path(args.recipe) if args.recipe else find_recipe(model.path)
    canvas = [f"data.options.eval_size=[{args.eval_size[0]}, {args.eval_size[1]}]"] if args.eval_size else []
    overrides = ["logging.wandb.mode=disabled", *([f"data.root={args.root}"] if args.root else []), *canvas,
                 *args.overrides]  # fmt: skip
    recipe = load_recipe(recipe_path, overrides)
    if recipe.data.name != dataset:
        raise SystemExit(f"{recipe_path}: the recipe's dataset is {recipe.data.name!r}, this benchmark is {dataset}")
    result = evaluate_student(
        recipe, model.path, args.split, save_preds=preds_dir, reference=reference(args), progress=not args.quiet
    )
    result.update(preds_dir=str(preds_dir), recipe=str(recipe_path), resolved_recipe=recipe.to_dict())
    return result


def train_fixture_student(dataset: str, work: Path, steps: int) -> Path:
    """Write the fixture dataset, train the tiny student for `steps` steps; returns its run directory."""
    from sak.data.fixtures import WRITERS
    from sak.engine import train

    root = WRITERS[dataset](work / "data", n_train=8, n_val=4, size=(48, 64), seed=0)
    channels = {t: NUM_CLASSES.get((dataset, t)) for t in DATASET_TASKS[dataset]}
    tasks = "[" + ", ".join(f"{{name: {t}, channels: {c or 'null'}}}" for t, c in channels.items()) + "]"
    text = FIXTURE_RECIPE.format(dataset=dataset, out=work / "runs", tasks=tasks, root=root, steps=steps)
    path = work / "fixture_recipe.yaml"
    path.write_text(text)
    recipe = load_recipe(path)
    train(recipe)
    return recipe.run_dir


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------
def published_rows(dataset: str) -> list[dict]:
    """The published rows of the SAK paper (`sak.metrics.published`): model, params, scores, delta_m, note."""
    from sak.metrics.published import PUBLISHED

    return [
        {
            "model": model,
            "params": None if row.params_m is None else f"{row.params_m:g}M",
            "scores": dict(row.scores),
            "delta_m": row.delta_m,
            "note": row.note,
        }
        for model, row in PUBLISHED[dataset].items()
    ]


def _cell(value: float | None, task: str | None = None) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return f"{value:.4f}" if task == "depth" else f"{value:.2f}"


def _params(value: int | str | None) -> str:
    if isinstance(value, int):
        return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value:,}"
    return value or "—"


def markdown(dataset: str, results: list[dict], command: str, fixture: bool, picture: Path | None) -> str:
    columns = COLUMNS[dataset]
    lines = [f"# {TITLES[dataset]}", ""]
    if fixture:
        lines += [FIXTURE_NOTE, ""]
    lines += [f"Command: `{command}`", ""]
    lines += ["| model | params | " + " | ".join(c for _, c in columns) + " | delta_m % |"]
    lines += ["| --- | --- | " + " | ".join("---" for _ in columns) + " | --- |"]
    for r in results:
        cells = [_cell(r["headline"].get(t), t) for t, _ in columns]
        delta = "—" if r.get("delta_m") is None else f"{r['delta_m']:+.2f}"
        lines.append(f"| {r['name']} (ours) | {_params(r.get('params'))} | " + " | ".join(cells) + f" | {delta} |")
    for row in published_rows(dataset):
        cells = [_cell(row["scores"].get(t), t) for t, _ in columns]
        delta = "—" if row.get("delta_m") is None else f"{row['delta_m']:+.2f}"
        label = f"{row['model']} (published)"
        lines.append(f"| {label} | {_params(row.get('params'))} | " + " | ".join(cells) + f" | {delta} |")
    lines += [""]
    lines += [
        "Our rows: the published metric definitions (docs/metrics.md) through `sak.engine.task_eval`; delta_m "
        + (
            "against the single-task scores of `--reference`"
            if "--reference" in command
            else "against the published single-task row (the ViT-L one"
            + (
                ": SAK ViT-B's published +0.83 is against ViT-B single-task baselines, and its scores give +0.20 "
                "against this row"
                if dataset == "pascal_context"
                else ""
            )  # (no ViT-B row for NYUD-v2)
            + "; pass `--reference` for others)"
        )
        + ". Published rows: the paper's numbers (ViT-L students unless named), not re-run here.",
        "",
    ]
    for r in results:
        source = (
            "a temporary run trained by `--fixture`"
            if r.get("fixture")
            else f"`{r.get('checkpoint') or r.get('predictions')}`"
        )
        lines.append(
            f"- {r['name']}: {r['n_images']} images of `{r['split']}` from {source}; scored in {r['seconds']:.1f} s"
        )
    for row in published_rows(dataset):
        if row["note"]:
            lines.append(f"- {row['model']} (published): {row['note']}")
    if picture is not None:
        lines += ["", f"![image, ground truth and prediction per task]({picture.name})"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# the picture
# ---------------------------------------------------------------------------------------------
def _palette(n: int = 256) -> np.ndarray:
    """A fixed palette: matplotlib's qualitative maps one after another, black for ignore (255)."""
    from matplotlib import colormaps

    colours = np.concatenate([colormaps[m].colors for m in ("tab20", "tab20b", "tab20c", "Set3", "Pastel1")])[:, :3]
    palette = np.resize(colours, (n, 3))
    palette[255] = 0.0
    return palette


def colourise(task: str, array: np.ndarray, truth: bool, depth_range: tuple[float, float]) -> tuple[np.ndarray, dict]:
    """One map of `task` -> (array for imshow, imshow keywords). Ignored ground-truth pixels are black
    (labels, normals) or masked (maps); depth of truth and prediction share `depth_range`."""
    if task in ("semseg", "parts"):
        return _palette()[np.clip(array.astype(np.int64), 0, 255)], {}
    if task == "normals":  # (3, H, W)
        rgb = np.clip((array.transpose(1, 2, 0) + 1) / 2, 0, 1)
        if truth:
            rgb[np.abs(array).sum(0) == 0] = 0
        return rgb, {}
    x = array[0].astype(np.float32)
    if task == "depth":
        lo, hi = depth_range
        return (np.ma.masked_where(x <= 0, x) if truth else x), {"cmap": "viridis", "vmin": lo, "vmax": hi}
    cmap = "inferno" if task == "saliency" else "gray_r"
    return (np.ma.masked_where(x == 255, x) if truth else x), {"cmap": cmap, "vmin": 0.0, "vmax": 1.0}


def _depth_range(truth: np.ndarray) -> tuple[float, float]:
    valid = truth[truth > 0]
    return (float(valid.min()), float(valid.max())) if valid.size else (0.0, 1.0)


def picture(dataset: str, root: str, split: str, preds_dir: Path, tasks: list[str], out: Path, n: int, title: str,
            options: dict | None = None):  # fmt: skip
    """Rows: the first `n` images of the split; columns: image, then ground truth | prediction per task.
    `options`: the dataset's, as the model was scored with (a larger `eval_size` canvas)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sak.data import DatasetSpec, build_dataset
    from sak.data.transforms import unpad
    from sak.engine.predictions import read_prediction

    data = build_dataset(dataset, DatasetSpec(root=root, split=split, tasks=tuple(tasks), train=False), options or {})
    rows = min(n, len(data))
    cols = 1 + 2 * len(tasks)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.4 * rows + 0.5), squeeze=False)
    for r in range(rows):
        sample = data[r]
        size = sample["size"].tolist()
        axes[r, 0].imshow(unpad(sample["image"], size).permute(1, 2, 0).numpy())
        axes[r, 0].set_ylabel(sample["id"], fontsize=6)
        for j, task in enumerate(tasks):
            gt = unpad(sample[task], size).numpy()
            pred = read_prediction(preds_dir, task, sample["id"], size).numpy()
            for k, (array, what) in enumerate(((gt, "truth"), (pred, "pred"))):
                image, kw = colourise(task, array, what == "truth", _depth_range(gt))
                ax = axes[r, 1 + 2 * j + k]
                ax.imshow(image, interpolation="nearest", **kw)
                if r == 0:
                    ax.set_title(f"{task}\n{what}", fontsize=7)
    axes[0, 0].set_title("image", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"{title}: the first {rows} images of {split}; ignored ground truth black (labels, normals) or blank (maps)",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def parser(dataset: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action=_AddModel, dest="models", help="run dir, checkpoint, .safetensors or export")
    p.add_argument("--preds", action=_AddModel, dest="models", help="a folder of prediction files (needs --root)")
    p.add_argument("--name", action=_NameModel, dest="models", help="row label of the model given just before")
    p.add_argument("--recipe", default=None, help="the checkpoints' recipe (default: the recipe.yaml beside them)")
    p.add_argument("--root", default=None, help=f"the {dataset} folder (overrides the recipe's data.root)")
    p.add_argument("--split", default="val")
    p.add_argument("--eval-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="evaluation canvas, for images larger than the default (checkpoint rows: as the override "
                   "data.options.eval_size=[H, W])")  # fmt: skip
    p.add_argument("--reference", default=None, help="JSON of single-task scores for delta_m ({task: value}, as sak "
                   "eval --reference); default: the published single-task row (ViT-L)")  # fmt: skip
    p.add_argument("--fixture", action="store_true", help="write the fixture, train a tiny student, benchmark it")
    p.add_argument("--steps", type=int, default=40, help="training steps of the --fixture student")
    p.add_argument("--images", type=int, default=3, help="images in the picture")
    p.add_argument("--out", default=None, help=f"output prefix (default benchmarks/results/{dataset}[_fixture])")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of the checkpoints' recipe")
    return p


def main(dataset: str, doc: str, argv: list[str] | None = None) -> int:
    args = parser(dataset, doc).parse_args(argv)
    models: list[Model] = list(args.models or [])
    if not models and not args.fixture:
        raise SystemExit("give at least one --checkpoint or --preds, or --fixture")
    if models and args.fixture:  # (the fixture's folder became every row's data.root: a real checkpoint scored on it)
        raise SystemExit("--fixture benchmarks its own tiny student on the synthetic fixture: run it without "
                         "--checkpoint / --preds, and those without --fixture")  # fmt: skip
    prefix = Path(args.out) if args.out else RESULTS / (f"{dataset}_fixture" if args.fixture else dataset)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    command = f"python -m benchmarks.{dataset} " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.fixture:
            start = time.perf_counter()
            run_dir = train_fixture_student(dataset, work, args.steps)
            train_seconds = time.perf_counter() - start
            print(f"[bench] trained the fixture student ({args.steps} steps) in {train_seconds:.1f} s")
            models.insert(0, Model("checkpoint", run_dir, f"tiny student, {args.steps} steps on the fixture"))
            args.root = args.root or str(work / "data")
        results = []
        for k, model in enumerate(models):
            start = time.perf_counter()
            result = evaluate_model(model, dataset, args, work / f"preds{k}")
            result.update(name=model.name or model.path.name, seconds=time.perf_counter() - start)
            if args.fixture and k == 0:
                result.update(fixture=True, train_seconds=train_seconds, train_steps=args.steps)
                result["checkpoint"] = "the temporary run of --fixture (deleted afterwards)"
                result["recipe"] = "FIXTURE_RECIPE of benchmarks/dense_common.py (resolved_recipe: as run)"
            results.append(result)
        first = results[0]
        preds_dir = Path(first.pop("preds_dir"))
        for r in results:  # (temporary folders, gone afterwards)
            r.pop("preds_dir", None)
        png = prefix.with_name(prefix.name + ".png")
        payload = {"command": command, "dataset": dataset, "fixture": args.fixture, "models": results,
                   "published": published_rows(dataset)}  # fmt: skip
        # the scores are written before the picture is drawn: a failing picture loses none of them
        prefix.with_name(prefix.name + ".json").write_text(json.dumps(payload, indent=2) + "\n")
        md = markdown(dataset, results, command, args.fixture, png)
        prefix.with_name(prefix.name + ".md").write_text(md)
        print(md)
        tasks = [t for t, _ in COLUMNS[dataset] if t in first["tasks"]]
        data = first.get("resolved_recipe", {}).get("data", {})
        root = args.root or data["root"]
        options = (
            data.get("options")
            if "resolved_recipe" in first
            else {"eval_size": args.eval_size}
            if args.eval_size
            else None
        )
        picture(dataset, root, args.split, preds_dir, tasks, png, args.images, first["name"], options)
    return 0
