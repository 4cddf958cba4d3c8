"""`make demo` (or `python -m sak.demo [key=value ...]`): distil the bundled default recipe and write a
report folder: a feature grid (image | each teacher's PCA map | the student's map for that teacher),
loss curves, and held-out student-teacher cosine per teacher before and after training."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .config import Recipe, RecipeError, load_recipe  # noqa: E402
from .engine import train  # noqa: E402
from .engine.logging import nan_for_null  # noqa: E402
from .engine.viz import feature_grid, save_figure  # noqa: E402
from .files import write_text_whole  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[1] / "recipes" / "demo" / "default.yaml"


def loss_curves(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    keys = sorted({k for r in rows for k in r if k.startswith("distill/")})
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts, strict=True), label=key.removeprefix("distill/"))
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss (train)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def cosine_table(rows: list[dict]) -> str:
    val = [r for r in rows if any(k.startswith("val/cosine/") for k in r)]
    after = val[-1]
    before = val[0] if val[0].get("step") == 0 else {}  # (an evaluation before training: eval.at_start)
    lines = [
        "| teacher | held-out cosine before | after | change | spatial cosine after |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key in sorted(k for k in after if k.startswith("val/cosine/")):
        tid = key.removeprefix("val/cosine/")
        a, b, spatial = after[key], before.get(key), after.get(f"val/spatial_cosine/{tid}")
        change = ("-", "-") if b is None else (f"{b:.3f}", f"{a - b:+.3f}")
        shown = "-" if spatial is None else f"{spatial:.3f}"
        lines.append(f"| {tid} | {change[0]} | {a:.3f} | {change[1]} | {shown} |")
    return "\n".join(lines)


def write_report(recipe: Recipe) -> Path:
    report = recipe.run_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    lines = (recipe.run_dir / "metrics.jsonl").read_text().splitlines()
    # metrics.jsonl writes NaN and infinity as null (JSON has no such numbers): a diverged run's values read as NaN
    rows = [nan_for_null(json.loads(line)) for line in lines]
    loss_curves(rows, report / "loss_curves.png")
    feature_grid(recipe, recipe.run_dir, report / "features.png")
    teachers = ", ".join(f"{t.id} ({t.name})" for t in recipe.teachers)
    table = cosine_table(rows)
    write_text_whole(
        report / "summary.md",
        f"# sak demo: {recipe.run.name}\n\nTeachers: {teachers}.\n\n{table}\n\n"
        "Held-out cosine: each image's flattened student and teacher maps, in the teacher's space; a student that "
        "predicts the teacher's mean feature alone scores high on it. The spatial cosine takes each map's mean "
        "over the image away first: how much of the teacher's spatial structure the student has learnt.\n\n"
        "features.png: held-out images | for each teacher, its last-level features (PCA to RGB) and the "
        "student's features for that teacher in the same PCA basis.\n",
    )
    return report


def made_by_the_demo(run_dir: Path) -> bool:
    """Whether every start of the run in `run_dir` was the demo's (the commands starts.jsonl records): a run
    directory the demo is pointed at that holds another run's checkpoints keeps them."""
    starts = run_dir / "starts.jsonl"
    if not starts.is_file():
        return False
    try:
        commands = [json.loads(line).get("command") or [] for line in starts.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError:
        return False
    return bool(commands) and all(c and Path(str(c[0])).name in ("demo.py", "sak.demo") for c in commands)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sak.demo", description=__doc__)
    parser.add_argument(
        "overrides", nargs="*", default=[], help="key.path=value overrides of recipes/demo/default.yaml"
    )
    parser.add_argument("--recipe", default=str(DEFAULT))
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as exc:
        print(f"sak: {exc}", file=sys.stderr)
        return 2
    names = ", ".join(f"{t.id} ({t.name})" for t in recipe.teachers)
    print(
        f"[sak demo] distilling {len(recipe.teachers)} frozen teachers [{names}] into a {recipe.student.model} "
        f"student on the `{recipe.data.name}` dataset, {recipe.schedule.max_steps} steps on CPU. "
        f"Run directory: {recipe.run_dir}"
    )
    old = recipe.run_dir / "checkpoints"
    if recipe.checkpoint.resume == "never" and old.is_dir() and made_by_the_demo(recipe.run_dir):
        # the demo starts afresh each time and keeps its latest run only (the engine would set an earlier run's
        # checkpoints aside, 45 MB per `make demo`); any other run directory is left to the engine, which sets
        # its checkpoints aside rather than deleting them
        print(f"[sak demo] removing the previous demo run's checkpoints in {old}")
        shutil.rmtree(old)
    try:
        final = train(recipe)
    except RecipeError as exc:  # as `sak train`: one line for what only the run can find out, and bad input
        print(f"sak: {args.recipe}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from .cli import print_user_error

        if not print_user_error(exc, "demo"):
            raise
        return 2
    if not final:  # run.stop_at: no final evaluation to report yet
        print("[sak demo] stopped before the end (run.stop_at): no report, which needs the final evaluation")
        return 0
    report = write_report(recipe)
    print((report / "summary.md").read_text())
    print(f"[sak demo] report: {report}/ (summary.md, features.png, loss_curves.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
