"""Score a student on the dense tasks of PASCAL-Context or NYUD-v2 (or of another dataset: `dataset_tasks`)
or score prediction files saved by any model (docs/metrics.md).

Both paths score exactly the same numbers:
- ground truth comes from the dataset classes (evaluation split, no augmentation), cropped back from the
  evaluation canvas with `unpad(target, size)`, then `dataset.eval_target` (the benchmark's own ground
  truth where it differs from the training target: PASCAL-Context boundaries are SEISM's seg2bmap of the
  label map);
- a student's prediction is cropped back the same way and passed through `encode` -> `decode` (the stored
  file format, `predictions.py`), so it holds the values a saved file holds;
- every metric is updated once per sample on the CPU, and the per-sample states (additive) are summed in
  dataset order. N processes give the numbers of one process bit for bit, and a saved prediction folder
  scored with `score_prediction_dir` gives the in-memory numbers bit for bit.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, gather_object
from torch import Tensor
from tqdm.auto import tqdm

from ..config import Recipe, RecipeError
from ..data import DatasetSpec, build_dataset
from ..data.images import DataError
from ..data.nyud import NYUD
from ..data.pascal_context import SKIP_BAD_HINT, PascalContext
from ..data.transforms import unpad
from ..registry import DATASETS
from ..tasks import Task, create_task
from .build import build_loader
from .checkpoint import first_misfit
from .export import ExportError, build_exported, export_config, inference_state, load_exported
from .fit import check_canvas
from .init import one_checkpoint
from .predictions import SUFFIX, PredictionError, decode, encode, read_prediction, save_encoded

DATASET_TASKS = {
    "pascal_context": ("semseg", "parts", "saliency", "normals", "edges"),
    "nyud": ("semseg", "depth", "normals", "edges"),
}
NUM_CLASSES = {
    (name, task): count
    for name, dataset in (("pascal_context", PascalContext), ("nyud", NYUD))
    for task, count in dataset.task_classes.items()
}


class EvalError(ValueError):
    """Evaluation cannot run as asked (dataset, tasks, checkpoint or reference); the message says why."""


def dataset_tasks(name: str) -> tuple[str, ...]:
    """The tasks dataset `name` is scored on: PASCAL-Context's and NYUD-v2's published sets; another registered
    dataset's `supported_tasks` that have a metric (a plug-in's, whose module the recipe imports)."""
    from ..metrics import METRICS

    if name in DATASET_TASKS:
        return DATASET_TASKS[name]
    supported = getattr(DATASETS.get(name), "supported_tasks", ()) if name in DATASETS else ()
    return tuple(t for t in supported if t in METRICS)


def check_dataset(name: str) -> None:
    if name not in DATASETS:
        raise EvalError(f"unknown dataset {name!r} (a plug-in's module not in the recipe's imports?); known: "
                        f"{', '.join(DATASETS.names())}")  # fmt: skip
    if not dataset_tasks(name):
        from ..metrics import METRICS

        raise EvalError(
            f"task evaluation scores pascal_context, nyud and datasets whose supported_tasks have a metric "
            f"({', '.join(METRICS.names())}); {name!r} has none"
        )


def dataset_classes(name: str) -> dict[str, int]:
    """The class counts dataset `name` fixes, {task: classes}: PASCAL-Context's and NYUD-v2's, a plug-in's
    `task_classes` ({} where the heads' channels decide)."""
    if name in DATASET_TASKS:
        return {task: count for (dataset, task), count in NUM_CLASSES.items() if dataset == name}
    return dict(getattr(DATASETS.get(name), "task_classes", {})) if name in DATASETS else {}


def require_size(dataset, sample: dict) -> None:
    """An evaluation sample (or batch) carries its original size, which predictions are cropped back to."""
    if "size" not in sample:  # (a bare KeyError before)
        raise EvalError(f"{type(dataset).__name__}'s evaluation samples carry no 'size', the original (h, w) the "
                        "predictions are cropped back to (docs/datasets.md)")  # fmt: skip


def metric_options(name: str, tasks: dict[str, Task]) -> dict[str, dict]:
    """Each task's metric options: PASCAL-Context's and NYUD-v2's published ones (by `build_metric`'s dataset);
    for another dataset its `metric_options`, with a segmentation head's channels as its class count."""
    if name in DATASET_TASKS:
        return {t: {} for t in tasks}
    own = getattr(DATASETS.get(name), "metric_options", {})
    return {t: {**({"num_classes": task.channels} if t in ("semseg", "parts") else {}), **own.get(t, {})}
            for t, task in tasks.items()}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# per-sample metric states, summed in dataset order
# ---------------------------------------------------------------------------------------------
class SampleScores:
    """One metric per task; `add` records each sample's own (additive) state, `compute` sums the states
    in dataset order and scores the sum. The order fixes the floating-point result, whatever the number
    of processes and whether the predictions came from memory or from files."""

    def __init__(self, dataset: str, tasks: list[str], options: dict[str, dict] | None = None) -> None:
        from ..metrics import DATASET_OPTIONS, build_metric

        self.dataset = dataset
        known = dataset if dataset in DATASET_OPTIONS else None  # (another dataset's: `options`, see metric_options)
        try:
            self.metrics = {t: build_metric(t, known, **(options or {}).get(t, {})) for t in tasks}
        except ValueError as exc:  # (a plug-in dataset's metric_options: said whose they are)
            if known is not None:
                raise
            raise EvalError(f"dataset {dataset!r}: its metric_options {options}: {exc}") from exc
        self.states: dict[str, dict[int, dict[str, Tensor]]] = {t: {} for t in tasks}

    def add(self, task: str, index: int, pred: Tensor, target: Tensor) -> None:
        """pred: one sample in the update() conventions (CPU); target: the dataset's, cropped back."""
        metric = self.metrics[task]
        metric.reset()
        metric.update(pred[None], target[None].contiguous())
        self.states[task][index] = {k: v.detach().cpu().clone() for k, v in metric.state().items()}

    def gather(self, accelerator: Accelerator) -> None:
        """Every process gets every sample's states; a sample seen twice is an error (padded shards)."""
        if accelerator.num_processes == 1:
            return
        merged: dict[str, dict[int, dict[str, Tensor]]] = {t: {} for t in self.states}
        for states in gather_object([self.states]):
            for task, per_sample in states.items():
                twice = merged[task].keys() & per_sample.keys()
                if twice:
                    raise RuntimeError(f"{task}: samples {sorted(twice)[:5]} were scored by two processes")
                merged[task].update(per_sample)
        self.states = merged

    @property
    def n_images(self) -> int:
        return len(set().union(*(s.keys() for s in self.states.values()))) if self.states else 0

    def compute(self) -> dict[str, dict[str, float]]:
        scores = {}
        for task, metric in self.metrics.items():
            total: dict[str, Tensor] | None = None
            for index in sorted(self.states[task]):
                state = self.states[task][index]
                total = dict(state) if total is None else {k: total[k] + v for k, v in state.items()}
            metric.reset()
            if total is not None:
                metric.load_state(total)
            scores[task] = {k: float(v) for k, v in metric.compute().items()}
        return scores

    def headline(self, scores: dict[str, dict[str, float]]) -> dict[str, float]:
        return {t: scores[t][m.headline] for t, m in self.metrics.items()}

    def lower_is_better(self) -> set[str]:
        return {t for t, m in self.metrics.items() if not m.higher_is_better}


# ---------------------------------------------------------------------------------------------
# delta_m against the published single-task references (or the user's)
# ---------------------------------------------------------------------------------------------
def published_reference(dataset: str) -> dict[str, float]:
    """The published single-task row of the SAK paper (ViT-L), {task: headline value}; {} for a dataset it has
    none of (delta_m then only against the user's --reference)."""
    from ..metrics.published import SINGLE_TASK

    return dict(SINGLE_TASK.get(dataset, {}))


def load_reference(path: str | Path) -> dict[str, float]:
    """A JSON file {task: headline value} to compute delta_m against."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError, RecursionError) as exc:  # (JSON, UTF-8, an integer's digits, nesting)
        raise EvalError(f"{path}: cannot read the reference JSON ({exc})") from exc
    known = set(SUFFIX)
    if not isinstance(data, dict) or not all(
        k in known and isinstance(v, int | float) and not isinstance(v, bool) for k, v in data.items()
    ):
        raise EvalError(f"{path}: expected {{task: number}} with tasks among {sorted(known)}, got {data!r}")
    # delta_m divides by each value; every headline metric is positive (a negative one flipped delta_m's sign)
    bad = {k: v for k, v in data.items() if not (0 < v < 1e300)}  # (a 400-digit int: float() overflows)
    if bad:
        raise EvalError(f"{path}: reference values must be finite and above 0 (delta_m divides by them), got {bad}")
    return {k: float(v) for k, v in data.items()}


def check_reference(reference: dict[str, float] | None, tasks) -> None:
    """A user's reference must share a task with those scored: else delta_m was left out without a word."""
    if reference is not None and not set(reference) & set(tasks):
        raise EvalError(
            f"--reference has none of the tasks scored here ({', '.join(tasks)}); it has {', '.join(sorted(reference))}, "
            "so no delta_m could be computed against it"
        )


def summarize(
    scorer: SampleScores, scores: dict[str, dict[str, float]], reference: dict[str, float] | None
) -> dict[str, object]:
    """delta_m over the tasks the reference has (published single-task row by default)."""
    from ..metrics import delta_m

    source = "user" if reference is not None else "published single-task"
    if reference is None:
        reference = published_reference(scorer.dataset)
        source = source if reference else "none"  # (a dataset without a published row)
    headline = scorer.headline(scores)
    unscored = [t for t in headline if t in reference and not math.isfinite(headline[t])]
    if unscored:  # (a task with nothing to score, e.g. parts on a split without people, would make delta_m NaN)
        warnings.warn(f"delta_m leaves out {unscored}: nothing was scored for them", RuntimeWarning, stacklevel=2)
    common = [t for t in headline if t in reference and t not in unscored]
    lower = scorer.lower_is_better()
    value = None
    if common:
        value = delta_m({t: headline[t] for t in common}, {t: reference[t] for t in common}, lower & set(common))
    return {
        "headline": headline,
        "headline_metric": {t: m.headline for t, m in scorer.metrics.items()},
        "delta_m": value,
        "delta_m_tasks": common,
        "reference": {"source": source, **{t: reference[t] for t in common}},
    }


# ---------------------------------------------------------------------------------------------
# a student: checkpoint or export -> scores (and optionally the prediction files)
# ---------------------------------------------------------------------------------------------
def load_student(recipe: Recipe, checkpoint: Path) -> tuple[torch.nn.Module, dict]:
    """An export directory (`sak export`) as it is; a run directory, checkpoint directory or .safetensors file
    as the recipe's inference student, what `sak export` would write (no teachers are built)."""
    if not checkpoint.exists():
        raise FileNotFoundError(f"--checkpoint {str(checkpoint)!r} does not exist")
    if (checkpoint / "student.yaml").is_file():
        try:
            return load_exported(checkpoint)
        except ExportError as exc:  # an export whose two files do not fit each other
            raise EvalError(f"--checkpoint {exc}") from exc
    try:
        config = export_config(recipe)
        return build_exported(config, inference_state(checkpoint, "--checkpoint")[1]), config
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"--checkpoint {str(checkpoint)!r} is neither an export directory (student.yaml), a checkpoint "
            "directory (model.safetensors), a run directory (checkpoints/) nor a .safetensors file"
        ) from exc
    except RuntimeError as exc:  # load_state_dict: the weights are another student's
        raise EvalError(
            f"--checkpoint {str(checkpoint)!r}: the weights do not fit the recipe's student ({first_misfit(exc)})"
        ) from exc


def eval_tasks(dataset: str, config: dict) -> dict[str, Task]:
    """The student's tasks that the dataset has metrics for; segmentation heads must match the classes."""
    tasks = {t["name"]: create_task(t["name"], t["channels"]) for t in config["tasks"]}
    tasks = {name: task for name, task in tasks.items() if name in dataset_tasks(dataset)}
    if not tasks:
        raise EvalError(f"the student has none of the tasks {list(dataset_tasks(dataset))} of {dataset}")
    fixed = dataset_classes(dataset)
    for name, task in tasks.items():
        classes = fixed.get(name)
        if classes is not None and task.channels != classes:
            raise EvalError(f"the student's {name} head has {task.channels} channels; {dataset} has {classes} classes")
    return tasks


@torch.no_grad()
def evaluate_student(
    recipe: Recipe,
    checkpoint: Path,
    split: str = "val",
    save_preds: Path | None = None,
    reference: dict[str, float] | None = None,
    progress: bool = True,
) -> dict:
    """Score `checkpoint` on `split` of the recipe's dataset in every process of the launch; returns the
    result (in every process): dataset, split, checkpoint, n_images, tasks {task: metrics}, delta_m."""
    check_dataset(recipe.data.name)
    cpu = not torch.cuda.is_available()
    if cpu and recipe.precision.mixed == "fp16":
        raise RecipeError("precision.mixed: fp16 needs a CUDA GPU; on the CPU use bf16 or no")
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=recipe.precision.mixed,
        dataloader_config=DataLoaderConfiguration(even_batches=False),  # disjoint shards, no repeated samples
    )
    checkpoint = one_checkpoint(accelerator, Path(checkpoint))
    model, config = load_student(recipe, checkpoint)
    tasks = eval_tasks(recipe.data.name, config)
    unscored = [t["name"] for t in config["tasks"] if t["name"] not in tasks]
    if unscored and accelerator.is_main_process:  # (left out without a word before)
        warnings.warn(f"the student's {unscored} have no metric on {recipe.data.name}: not scored", RuntimeWarning,
                      stacklevel=2)  # fmt: skip
    check_reference(reference, tasks)  # before scoring, not after
    others = (
        sorted({p.name for p in save_preds.iterdir()} & set(SUFFIX) - set(tasks))
        if save_preds and save_preds.is_dir()
        else []
    )
    if others and accelerator.is_main_process:  # (eval-preds would score them beside this run's as one model's)
        warnings.warn(f"--save-preds {save_preds} holds {', '.join(others)} of an earlier run, which this one "
                      "does not write", RuntimeWarning, stacklevel=2)  # fmt: skip
    # the targets of the tasks scored (an export's own, which the recipe's `tasks:` may not list)
    loader = build_loader(recipe, split, train=False, batch_size=recipe.eval.batch_size, tasks=tuple(tasks))
    loader.dataset.tasks = tasks  # (the labels checked against the heads scored, the export's, not the recipe's)
    dataset = loader.dataset.dataset
    if hasattr(dataset, "eval_size"):  # (PASCAL-Context, NYUD-v2)
        check_canvas(model, dataset.eval_size)
    else:  # another dataset's, as training checks it
        canvas = type(dataset).prediction_canvas(dataset.spec.image_size, dataset.options)[0]
        check_canvas(model, tuple(canvas), f"data.options (the evaluation canvas of {type(dataset).__name__})")
    model = model.to(accelerator.device).eval()
    loader = accelerator.prepare(loader)
    scorer = SampleScores(recipe.data.name, list(tasks), metric_options(recipe.data.name, tasks))
    bar = tqdm(loader, desc=f"eval {recipe.data.name}/{split}", disable=not (progress and accelerator.is_main_process))
    for batch in bar:
        require_size(dataset, batch)
        with accelerator.autocast():
            logits = model(batch["image"], with_features=False).tasks
        for name, task in tasks.items():
            preds = task.predict(logits[name].float())
            for b, index in enumerate(batch["index"].tolist()):
                size = batch["size"][b].tolist()
                try:
                    array = encode(name, unpad(preds[b], size))
                except PredictionError as exc:  # (a NaN / inf output): which image
                    raise PredictionError(f"image {batch['id'][b]!r} of {recipe.data.name}/{split}: {exc}") from exc
                if save_preds is not None:
                    save_encoded(save_preds, name, batch["id"][b], array)
                target = dataset.eval_target(batch["id"][b], name, unpad(batch[name][b], size).cpu())
                scorer.add(name, index, decode(name, array), target)
    scorer.gather(accelerator)
    with warnings.catch_warnings():
        if not accelerator.is_main_process:  # every process computes the same gathered scores; one warns
            warnings.simplefilter("ignore", RuntimeWarning)
        scores = scorer.compute()
        summary = summarize(scorer, scores, reference)
    return {
        "dataset": recipe.data.name,
        "split": split,
        "checkpoint": str(checkpoint),
        "n_images": scorer.n_images,
        "world_size": accelerator.num_processes,
        "params": sum(p.numel() for p in model.parameters()),
        "tasks": scores,
        **summary,
    }


# ---------------------------------------------------------------------------------------------
# a folder of saved predictions
# ---------------------------------------------------------------------------------------------
# the task names of the MTI-Net / ATRC / InvPT code that SAK's evaluation descends from, whose prediction
# folders are named after them; MTI-Net's files are in the formats read here, SAK's save_img writes its
# segmentations colour-coded (refused by name) and its edge maps into edge/img (its NMS step: edge/nms)
REFERENCE_CODE_NAMES = {"sal": "saliency", "edge": "edges", "human_parts": "parts"}


def _renaming(names: list[str]) -> str:
    hints = [f"{n} -> {REFERENCE_CODE_NAMES[n]}" for n in names if n in REFERENCE_CODE_NAMES]
    edge = (
        "; from SAK's save_img, edges/ takes edge/img's maps, not edge/nms's: sak thins them itself"
        if "edge" in names
        else ""
    )
    return f" (the reference code's names: rename {', '.join(hints)}{edge})" if hints else ""


def prediction_tasks(dataset: str, preds_dir: Path, tasks: list[str] | None) -> list[str]:
    supported = dataset_tasks(dataset)
    if tasks:
        unknown = [t for t in tasks if t not in supported]
        if unknown:
            raise EvalError(f"{dataset} has no task(s) {unknown}; it has {list(supported)}{_renaming(unknown)}")
        return list(tasks)
    found = [t for t in supported if (preds_dir / t).is_dir()]
    files = [t for t in supported if (preds_dir / t).exists() and not (preds_dir / t).is_dir()]
    if files:  # (a task named by a file went unscored without a word, and delta_m moved)
        raise PredictionError(f"{preds_dir}: {', '.join(files)} is a file, not a folder of predictions; move it "
                              "aside, or name the tasks to score with --tasks")  # fmt: skip
    others = sorted(p.name for p in preds_dir.iterdir() if p.is_dir() and p.name not in supported)
    if not found:
        listing = f"; it has {', '.join(others)}{_renaming(others)}" if others else ""
        raise PredictionError(
            f"{preds_dir}: no prediction folder of any {dataset} task ({', '.join(supported)}){listing}"
        )
    if others:  # e.g. `sal/` beside `semseg/`: saliency would silently go unscored
        warnings.warn(
            f"{preds_dir}: left out the folder(s) {', '.join(others)}, which name no {dataset} task "
            f"({', '.join(supported)}){_renaming(others)}",
            RuntimeWarning,
            stacklevel=2,
        )
    return found


def score_prediction_dir(
    dataset_name: str,
    root: str | Path,
    split: str,
    preds_dir: str | Path,
    tasks: list[str] | None = None,
    reference: dict[str, float] | None = None,
    options: dict | None = None,
    progress: bool = True,
) -> dict:
    """Score the prediction files under `preds_dir` (`<task>/<id>.png|.npy`, see predictions.py) against
    the ground truth of `split` under `root`; `tasks` None = every task folder found. `options` are the
    dataset's (e.g. a larger `eval_size` canvas for images bigger than the default)."""
    check_dataset(dataset_name)
    preds_dir = Path(preds_dir)
    if not preds_dir.is_dir():
        what = (
            "is a file, not the folder of predictions" if preds_dir.exists() else "the prediction folder does not exist"
        )
        raise PredictionError(f"{preds_dir}: {what}")
    tasks = prediction_tasks(dataset_name, preds_dir, tasks)
    unknown = [t for t in tasks if t in ("semseg", "parts") and t not in dataset_classes(dataset_name)]
    if unknown:  # (no head here to give them, as `sak eval` has)
        raise EvalError(f"{dataset_name} does not fix the classes of {unknown} (its task_classes), which saved "
                        "predictions do not tell: score them with sak eval, whose heads' channels do")  # fmt: skip
    check_reference(reference, tasks)
    spec = DatasetSpec(root=str(root), split=split, tasks=tuple(tasks), train=False)
    try:
        return _score_files(dataset_name, build_dataset(dataset_name, spec, options), split, preds_dir, tasks, reference,
                            progress)  # fmt: skip
    except DataError as exc:  # a bad ground-truth sample: the recipe's way past it is not this command's
        if SKIP_BAD_HINT not in str(exc):
            raise
        raise DataError(str(exc).replace(SKIP_BAD_HINT, "the published scores take every sample of the split: "
                                         "restore the file from the dataset's archive")) from None  # fmt: skip


def _warn_unscored_files(preds_dir: Path, tasks: list[str], ids: set[str], split: str) -> None:
    """Files in a task folder that are no prediction of the split's images (predictions of another split or
    of more images, another suffix) were left out in silence, the score read as covering them."""
    for task in tasks:
        expected = {sample_id + SUFFIX[task] for sample_id in ids}
        extra = sorted(p.name for p in (preds_dir / task).iterdir() if not p.name.startswith(".")
                       and p.name not in expected)  # fmt: skip
        if extra:
            warnings.warn(
                f"{preds_dir / task}: left out {len(extra)} file(s) that are no {split} image's prediction "
                f"(<id>{SUFFIX[task]}), e.g. {', '.join(extra[:3])}",
                RuntimeWarning,
                stacklevel=3,
            )


def _score_files(
    dataset_name: str, dataset, split: str, preds_dir: Path, tasks: list[str], reference, progress
) -> dict:
    """`score_prediction_dir`'s loop over the split."""
    classes = dataset_classes(dataset_name)
    heads = {t: create_task(t, classes.get(t)) for t in tasks}  # (a plug-in dataset's class counts, for its metrics)
    scorer, ids = SampleScores(dataset_name, tasks, metric_options(dataset_name, heads)), set()
    for index in tqdm(range(len(dataset)), desc=f"eval-preds {dataset_name}/{split}", disable=not progress):
        sample = dataset[index]
        ids.add(sample["id"])
        require_size(dataset, sample)
        size = sample["size"].tolist()
        for task in tasks:
            pred = read_prediction(preds_dir, task, sample["id"], size, classes.get(task))
            scorer.add(task, index, pred, dataset.eval_target(sample["id"], task, unpad(sample[task], size)))
    _warn_unscored_files(preds_dir, tasks, ids, f"{dataset_name}/{split}")
    scores = scorer.compute()
    return {
        "dataset": dataset_name,
        "split": split,
        "predictions": str(preds_dir),
        "n_images": scorer.n_images,
        "tasks": scores,
        **summarize(scorer, scores, reference),
    }


def format_summary(result: dict) -> str:
    """One line: the headline metric of every task and delta_m."""
    parts = [f"{result['dataset']}/{result['split']} ({result['n_images']} images)"]
    for task, value in result["headline"].items():
        parts.append(f"{task} {result['headline_metric'][task]} {value:.4g}")
    if result.get("delta_m") is not None:
        parts.append(f"delta_m {result['delta_m']:+.2f}% vs {result['reference']['source']}")
    return " | ".join(parts)


__all__ = [
    "DATASET_TASKS",
    "EvalError",
    "format_summary",
    "SampleScores",
    "evaluate_student",
    "load_reference",
    "load_student",
    "score_prediction_dir",
]
