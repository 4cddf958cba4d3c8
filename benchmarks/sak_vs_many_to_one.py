"""Does SAK keep each teacher's knowledge better than plain many-to-one distillation?

    python -m benchmarks.sak_vs_many_to_one [--recipe R] [--steps N] [overrides ...]

Trains the demo configuration twice with the same stem, data, steps and seed: once as SAK (a
teacher-specific adapter path per teacher) and once as many-to-one (one shared token stream with a
projection per teacher, as in SAK's pilot study and RADIO / Theia), and writes the held-out
student-teacher cosine per teacher (mean over levels and held-out crops) and the parameter counts to
benchmarks/results/sak_vs_many_to_one.{json,md}.
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


def run(recipe_path: str, architecture: str, steps: int, overrides: list[str], tmp: str) -> dict:
    recipe = load_recipe(
        recipe_path,
        [f"run.output_dir={tmp}", f"run.name={architecture}", f"student.architecture={architecture}",
         f"schedule.max_steps={steps}", "checkpoint.every=0", "logging.progress=false",
         "logging.wandb.mode=disabled", "eval.at_start=false", *overrides],
    )  # fmt: skip
    final = train(recipe)
    student = build_student(recipe, build_teachers(recipe, torch.device("cpu")), build_tasks(recipe))
    return {
        "cosine": {k.removeprefix("val/cosine/"): v for k, v in final.items() if k.startswith("val/cosine/")},
        "params": parameter_report(student),
        "teachers": [f"{t.id} ({t.name})" for t in recipe.teachers],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo" / "default.yaml"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder the JSON and markdown go to")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = {arch: run(args.recipe, arch, args.steps, args.overrides, tmp) for arch in ("sak", "many_to_one")}
    args.results.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.sak_vs_many_to_one " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.results / "sak_vs_many_to_one.json").write_text(json.dumps({"command": command, **results}, indent=2))
    teachers = list(results["sak"]["cosine"])
    lines = [
        "# SAK vs many-to-one distillation (held-out cosine per teacher)",
        "",
        f"Command: `{command}`; recipe `{Path(args.recipe).name}`, {args.steps} steps, same stem, data and seed.",
        f"Teachers: {', '.join(results['sak']['teachers'])}.",
        "",
        "| student | " + " | ".join(teachers) + " | mean | parameters (training / inference) |",
        "| --- | " + " | ".join("---" for _ in teachers) + " | --- | --- |",
    ]
    for arch, r in results.items():
        cos = [r["cosine"][t] for t in teachers]
        p = r["params"]
        lines.append(
            f"| {arch} | " + " | ".join(f"{c:.3f}" for c in cos)
            + f" | {sum(cos) / len(cos):.3f} | {p['total']:,} / {p['inference']:,} |"
        )  # fmt: skip
    md = "\n".join(lines) + "\n"
    (args.results / "sak_vs_many_to_one.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
