"""Data selection on a real labelled set, offline: which images should be labelled first?

    python -m benchmarks.selection                      # the teachers below that are registered
    python -m benchmarks.selection --teachers timm --option model=... --weights FILE   # any teacher

Pool and test set: scikit-learn's `load_digits` (1797 labelled 8 x 8 grey digits, 10 classes), split once
(stratified, 30% held out, split seed 0) into a pool of 1257 and a test set of 540. Images go to the
teacher as uint8 RGB 8 x 8 and its own preprocessing upsamples them (bicubic) to `--image-size` (112).
`--block` (ViT block, or a CNN's level) applies to every teacher when given; left out, each default teacher
uses its own (`DEFAULT_TEACHERS`: the penultimate block of dinov2_imgfocus, stage 3 of efficientnet_lite0),
any other teacher FreeSel's default.

Each method picks `budget` pool images from the teacher's features alone (labels are never read). The
chosen images are then labelled and a small downstream model is trained on them:
- "pixels": multinomial logistic regression on the raw 64 pixels. It does not use the teacher, so the
  score measures only which images were chosen, not how well the selection's feature space suits the
  downstream model (a model on the same teacher's features would favour whatever geometry the selecting
  method used).
- "teacher": the same regression on the teacher's global features (standardised), for reference.
Semantic patterns are computed once per teacher (k-means seed 0); the 5 seeds vary the sampling (the
first image for farthest / k-center, every draw for FreeSel's d^2 sampling and random). Reported: mean
and std of test accuracy over the seeds, the number of classes the selection covers, the feature-pass
time (once per teacher) and the sampling time per run.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from sak.config.yaml_read import read_pairs
from sak.methods import METHODS, select_indices
from sak.methods.freesel import PatternOptions, build_teacher, extract_features
from sak.teachers import list_teachers

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Real offline teachers, in order of preference, with the settings used for 8 x 8 digits.
DEFAULT_TEACHERS = {
    "dinov2_imgfocus": {"block": None},  # ViT-S/14 at 112 px: 8 x 8 patches, penultimate block, CLS-attention filter
    "efficientnet_lite0": {"block": 3},  # stage 3 (stride 16) at 112 px: 7 x 7 cells, norm filter
}


class DigitsPool(torch.utils.data.Dataset):
    """The pool as a sak-style dataset: {"image": uint8 (3, 8, 8), "id": "digit_NNNN"}."""

    def __init__(self, pixels: np.ndarray, indices: np.ndarray) -> None:
        self.images = torch.from_numpy(np.round(pixels * (255 / 16)).astype(np.uint8)).reshape(-1, 1, 8, 8)
        self.indices = indices

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i].expand(3, 8, 8).contiguous(), "id": f"digit_{self.indices[i]:04d}"}


def accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    if len(set(train_y.tolist())) < 2:  # one class seen: the model can only predict it
        return float(np.mean(test_y == train_y[0]))
    scaler = StandardScaler().fit(train_x)
    model = LogisticRegression(max_iter=3000).fit(scaler.transform(train_x), train_y)
    return float(model.score(scaler.transform(test_x), test_y))


def run_teacher(name: str, settings: dict, data: dict, args: argparse.Namespace) -> dict:
    """Feature pass once, then every method x budget x seed; accuracies of both downstream models."""
    torch.manual_seed(0)
    options = read_pairs(args.option, "--option")  # read as `sak select` reads them (1e-3 a number)
    teacher = build_teacher(name, args.weights, options, settings["image_size"], settings["block"])
    start = time.perf_counter()
    features, used = extract_features(teacher, data["pool"], PatternOptions(block=settings["block"]), args.batch_size)
    feature_seconds = time.perf_counter() - start
    global_pool = torch.stack([f.global_feature for f in features]).numpy()
    global_test = None
    if "teacher" in args.downstream:  # the test images' global features, for the reference model only
        test_features, _ = extract_features(
            teacher, data["test"], PatternOptions(block=settings["block"]), args.batch_size, progress=False
        )
        global_test = torch.stack([f.global_feature for f in test_features]).numpy()
    runs = []
    for method in args.methods:
        for budget in args.budgets:
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                chosen = select_indices(method, budget, len(features), features, seed=seed)
                row = {"method": method, "budget": budget, "seed": seed, "seconds": time.perf_counter() - t0}
                labels = data["pool_y"][chosen]
                row["classes"] = len(set(labels.tolist()))
                if "pixels" in args.downstream:
                    row["acc_pixels"] = accuracy(data["pool_x"][chosen], labels, data["test_x"], data["test_y"])
                if global_test is not None:
                    row["acc_teacher"] = accuracy(global_pool[chosen], labels, global_test, data["test_y"])
                runs.append(row)
    full = {}
    if "pixels" in args.downstream:
        full["acc_pixels"] = accuracy(data["pool_x"], data["pool_y"], data["test_x"], data["test_y"])
    if global_test is not None:
        full["acc_teacher"] = accuracy(global_pool, data["pool_y"], global_test, data["test_y"])
    meta = teacher.meta
    return {
        "teacher": name,
        "architecture": meta.name,
        "weights": meta.weights,
        "sha256": meta.sha256,
        "image_size": teacher.input_size,
        "block": settings["block"],
        "filter": used,
        "feature_seconds": feature_seconds,
        "full_pool": full,
        "runs": runs,
    }


def summarise(result: dict, key: str) -> dict:
    """(method, budget) -> mean, std of `key` and of the class count, mean sampling seconds."""
    table = {}
    for method in {r["method"] for r in result["runs"]}:
        for budget in {r["budget"] for r in result["runs"]}:
            rows = [r for r in result["runs"] if r["method"] == method and r["budget"] == budget]
            if rows and key in rows[0]:
                values = [r[key] for r in rows]
                table[(method, budget)] = {
                    "mean": statistics.mean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "classes": statistics.mean(r["classes"] for r in rows),
                    "seconds": statistics.mean(r["seconds"] for r in rows),
                }
    return table


def markdown(results: list[dict], args: argparse.Namespace, env: dict) -> str:
    lines = [
        "# Data selection on scikit-learn digits (FreeSel and baselines)",
        "",
        f"Command: `{shlex.join(['python', '-m', 'benchmarks.selection', *args.argv])}`",
        f"Pool {env['pool']} images, test {env['test']} images (stratified split, seed 0); "
        f"{args.seeds} seeds; {env['device']}, {env['threads']} threads, torch {env['torch']}.",
        "Accuracy (%) of logistic regression trained on the selected, labelled images, mean ± std over seeds; "
        "in brackets, the mean number of the 10 classes the selection contains.",
    ]
    for result in results:
        for key, title in (("acc_pixels", "raw pixels"), ("acc_teacher", "the teacher's global features")):
            table = summarise(result, key)
            if not table:
                continue
            block = "default" if result["block"] is None else result["block"]
            lines += ["", f"## {result['teacher']} ({result['architecture']}, {result['image_size']} px, "
                          f"block {block}, filter: {result['filter']}) — downstream on {title}", ""]  # fmt: skip
            lines += ["| method | " + " | ".join(str(b) for b in args.budgets) + " |"]
            lines += ["| --- |" + " --- |" * len(args.budgets)]
            for method in args.methods:
                cells = []
                for b in args.budgets:
                    s = table[(method, b)]
                    cells.append(f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} ({s['classes']:.1f})")
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append(
                f"| full pool ({env['pool']}) | {100 * result['full_pool'][key]:.1f} |" + " |" * (len(args.budgets) - 1)
            )
        sampling = summarise(result, "acc_pixels" if "acc_pixels" in result["full_pool"] else "acc_teacher")
        times = ", ".join(f"{m} {max(sampling[(m, b)]['seconds'] for b in args.budgets):.2f} s" for m in args.methods)
        lines += ["", f"Feature pass over the pool: {result['feature_seconds']:.1f} s. "
                      f"Sampling time at the largest budget: {times}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(results: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        key = "acc_pixels" if "acc_pixels" in result["full_pool"] else "acc_teacher"
        table = summarise(result, key)
        for method in args.methods:
            mean = [100 * table[(method, b)]["mean"] for b in args.budgets]
            std = [100 * table[(method, b)]["std"] for b in args.budgets]
            ax.errorbar(args.budgets, mean, yerr=std, marker="o", capsize=3, label=method)
        ax.axhline(100 * result["full_pool"][key], color="grey", linestyle=":", label="full pool")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(args.budgets, [str(b) for b in args.budgets])
        ax.set_xlabel("labelled images (budget)")
        on = "pixels" if key == "acc_pixels" else "the teacher's global features"
        ax.set_ylabel(f"test accuracy (%), logistic regression on {on}")
        ax.set_title(f"digits, selected with {result['teacher']}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teachers", nargs="+", default=None, help="default: the registered real offline teachers")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--option", action="append", default=[], help="teacher option KEY=VALUE (for --teachers timm)")
    parser.add_argument("--image-size", type=int, default=112, help="teacher input side, for every teacher")
    parser.add_argument(
        "--block",
        type=int,
        default=None,
        help="ViT block (or a CNN's level) for every teacher; default: each default teacher's own "
        "(dinov2_imgfocus: the penultimate block, efficientnet_lite0: stage 3), else FreeSel's default",
    )
    parser.add_argument("--budgets", type=int, nargs="+", default=[20, 50, 100, 200])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--downstream", nargs="+", choices=["pixels", "teacher"], default=["pixels", "teacher"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "selection")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    names = args.teachers or [n for n in DEFAULT_TEACHERS if n in list_teachers()]
    if not names:
        parser.error(f"none of the real offline teachers {list(DEFAULT_TEACHERS)} is registered; pass --teachers")

    digits = load_digits()
    pool_i, test_i = train_test_split(
        np.arange(len(digits.target)), test_size=0.3, stratify=digits.target, random_state=0
    )
    data = {
        "pool": DigitsPool(digits.data[pool_i], pool_i),
        "test": DigitsPool(digits.data[test_i], test_i),
        "pool_x": digits.data[pool_i] / 16.0,
        "pool_y": digits.target[pool_i],
        "test_x": digits.data[test_i] / 16.0,
        "test_y": digits.target[test_i],
    }
    env = {
        "pool": len(pool_i),
        "test": len(test_i),
        "device": "cuda" if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    results = []
    for name in names:
        settings = {"block": DEFAULT_TEACHERS.get(name, {}).get("block"), "image_size": args.image_size}
        if args.block is not None:  # given on the command line: it wins over the teacher's own default
            settings["block"] = args.block
        print(f"[selection] {name}: {settings}", flush=True)
        results.append(run_teacher(name, settings, data, args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"env": env, "budgets": args.budgets, "results": results},
                                                        indent=2))  # fmt: skip
    args.out.with_suffix(".md").write_text(markdown(results, args, env))
    plot(results, args, args.out.with_suffix(".png"))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
