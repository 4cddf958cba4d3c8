"""Does SAK keep each teacher's knowledge better than plain many-to-one distillation?

    python -m benchmarks.sak_vs_many_to_one [--recipe R] [--steps N] [--seeds 0 1 2] [overrides ...]

Trains the demo configuration as SAK (a teacher-specific adapter path per teacher) and as many-to-one (one
shared token stream with a projection per teacher, as in SAK's pilot study and RADIO / Theia), with the same
stem, data and steps, once per seed (`run.seed`: the student's initialisation, the augmentation and the order
of samples), and writes the held-out student-teacher cosine per teacher (mean over levels and held-out
crops), plain and spatial (each map's mean over the image taken away first: the structure a plain cosine of
mean-dominated maps hides), per seed and as the mean over seeds with its range, the difference SAK minus
many-to-one per seed, and the parameter counts, to benchmarks/results/sak_vs_many_to_one.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from sak.config import load_recipe
from sak.engine import train
from sak.engine.build import build_student, build_tasks, build_teachers
from sak.student import parameter_report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ARCHITECTURES = ("sak", "many_to_one")
MEASURES = {"cosine": "val/cosine/", "spatial_cosine": "val/spatial_cosine/"}


def run(recipe_path: str, architecture: str, steps: int, seed: int, overrides: list[str], tmp: str) -> dict:
    recipe = load_recipe(
        recipe_path,
        [f"run.output_dir={tmp}", f"run.name={architecture}_{seed}", f"student.architecture={architecture}",
         f"schedule.max_steps={steps}", f"run.seed={seed}", "checkpoint.every=0", "logging.progress=false",
         "logging.wandb.mode=disabled", "eval.at_start=false", *overrides],
    )  # fmt: skip
    final = train(recipe)
    result = {m: {k.removeprefix(p): v for k, v in final.items() if k.startswith(p)} for m, p in MEASURES.items()}
    student = build_student(recipe, build_teachers(recipe, torch.device("cpu")), build_tasks(recipe))
    return {**result, "params": parameter_report(student), "teachers": [f"{t.id} ({t.name})" for t in recipe.teachers]}


def summary(runs: dict[str, list[dict]], measure: str, teachers: list[str]) -> list[str]:
    """Markdown rows: each architecture's mean over seeds (min - max), then SAK minus many-to-one per seed."""
    lines = [f"| {measure} | " + " | ".join(teachers) + " | mean |", "| --- | " + " | ".join("---" for _ in teachers) + " | --- |"]  # fmt: skip
    for arch in ARCHITECTURES:
        cells = []
        for t in [*teachers, None]:
            per_seed = [sum(r[measure].values()) / len(teachers) if t is None else r[measure][t] for r in runs[arch]]
            mean = sum(per_seed) / len(per_seed)
            cells.append(
                f"{mean:.3f} ({min(per_seed):.3f} - {max(per_seed):.3f})" if len(per_seed) > 1 else f"{mean:.3f}"
            )
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    for a, b in zip(runs["sak"], runs["many_to_one"], strict=True):
        diffs = [a[measure][t] - b[measure][t] for t in teachers]
        mean = sum(diffs) / len(diffs)
        lines.append(
            f"| sak - many_to_one, seed {a['seed']} | " + " | ".join(f"{d:+.3f}" for d in diffs) + f" | {mean:+.3f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo" / "default.yaml"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder the JSON and markdown go to")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict]] = {arch: [] for arch in ARCHITECTURES}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:  # both architectures of a seed one after the other: a machine's drift hits both
            for arch in ARCHITECTURES:
                runs[arch].append({"seed": seed, **run(args.recipe, arch, args.steps, seed, args.overrides, tmp)})
    args.results.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.sak_vs_many_to_one " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.results / "sak_vs_many_to_one.json").write_text(json.dumps({"command": command.strip(), **runs}, indent=2))
    teachers = list(runs["sak"][0]["cosine"])
    params = {arch: runs[arch][0]["params"] for arch in ARCHITECTURES}
    lines = [
        "# SAK vs many-to-one distillation (held-out cosine per teacher)",
        "",
        f"Command: `{command.strip()}`; recipe `{Path(args.recipe).name}`, {args.steps} steps, the same stem, data "
        f"and steps; seeds {', '.join(map(str, args.seeds))} (each architecture's mean over them, with the range).",
        f"Teachers: {', '.join(runs['sak'][0]['teachers'])}. Parameters (training / inference): "
        + "; ".join(f"{a} {p['total']:,} / {p['inference']:,}" for a, p in params.items())
        + ".",
        "",
    ]
    for measure in MEASURES:
        lines += [*summary(runs, measure, teachers), ""]
    md = "\n".join(lines)
    (args.results / "sak_vs_many_to_one.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
