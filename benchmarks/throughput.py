"""Training-step throughput and what a teacher-feature cache buys, on this machine.

    python -m benchmarks.throughput            # every CPU case below; writes results/throughput_cpu.{json,md}
    python -m benchmarks.throughput --suite gpu --repeats 1   # the ViT-B cases at SAK's scale, on a CUDA GPU
    python -m benchmarks.throughput --case NAME --out FILE   # one case (run in its own process for peak memory)
    python -m benchmarks.throughput --only CASE ... --name FILE_STEM   # some cases, beside the suite's table

Cases: a bare PyTorch loop built from the same modules (same student, teachers, loss, optimiser,
precision; no Accelerate, logging or checkpoints) against the `sak` engine; online teachers against the
fp16 and int8 caches, in stage 1 and stage 2; 1, 2 and 3 teachers; a teacher at a lower resolution; the
student (on the GPU the teachers too) torch.compile'd (`precision.compile_student` / `compile_teachers`).
Step time is the median over the timed steps after warm-up, data loading excluded in both loops; the cache
cases compare wall-clock images/s (the loader reads the cache).
The cache's ideal speed-up is (teacher FLOPs + student step FLOPs) / student step FLOPs, counted with
torch.utils.flop_counter; each cached case reports the share of that bound it reaches, and the held-out
student-teacher cosine after the same number of steps as the online run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from sak.config import load_recipe
from sak.engine import train
from sak.engine.build import (
    build_distill_loss,
    build_loader,
    build_optimizer,
    build_student,
    build_target_normalizers,
    build_tasks,
    build_teachers,
    prepare_student,
    total_steps,
    warmup_steps,
)
from sak.engine.cache import build_cache
from sak.engine.malloc import keep_freed_memory
from sak.engine.prefetch import prefetch_enabled
from sak.engine.schedule import lr_lambda
from sak.engine.step import begin_step, compute_losses, teacher_targets
from sak.engine.trainer import teacher_dtype
from sak.files import write_text_whole

from .flops import flop_counter
from .throughput_table import table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STAGE1 = ROOT / "recipes" / "demo" / "default.yaml"
STAGE2 = ROOT / "recipes" / "bench" / "stage2_cpu.yaml"
ONE_TEACHER = ["teachers=[{name: dinov2_imgfocus, key: dinov2, image_size: 112}]"]  # the demo's first teacher
# the demo's first two teachers (HED left out)
TWO_TEACHERS = ["teachers=[{name: dinov2_imgfocus, key: dinov2, image_size: 112}, "
                "{name: efficientnet_lite0, key: effnet, image_size: 128}]"]  # fmt: skip
CASES = {  # name: (recipe, overrides, loop, cache dtype or None)
    "stage1/bare/online": (STAGE1, [], "bare", None),
    "stage1/sak/online": (STAGE1, [], "sak", None),
    "stage1/sak/fp16-cache": (STAGE1, [], "sak", "fp16"),
    "stage1/sak/int8-cache": (STAGE1, [], "sak", "int8"),
    "stage1/sak/online/1-teacher": (STAGE1, ONE_TEACHER, "sak", None),
    "stage1/sak/fp16-cache/1-teacher": (STAGE1, ONE_TEACHER, "sak", "fp16"),
    "stage1/sak/online/2-teachers": (STAGE1, TWO_TEACHERS, "sak", None),
    "stage1/sak/fp16-cache/2-teachers": (STAGE1, TWO_TEACHERS, "sak", "fp16"),
    "stage1/sak/online/teacher-at-half-size": (STAGE1, ["teachers.1.image_size=64"], "sak", None),
    "stage1/sak/online/compiled-student": (STAGE1, ["precision.compile_student=true"], "sak", None),
    "stage1/sak/online/glibc-default": (STAGE1, ["run.tune_malloc=false"], "sak", None),  # sak/engine/malloc.py
    "stage2/bare/online": (STAGE2, [], "bare", None),
    "stage2/sak/online": (STAGE2, [], "sak", None),
    "stage2/sak/fp16-cache": (STAGE2, [], "sak", "fp16"),
}
# The GPU configuration of the issue: ViT-B student, DINOv2-B + CLIP-B (384 px in stage 1, 512 in stage 2)
# and SAM-B at 1024, bf16, batch 16 (stage 1) and 8 (stage 2); random weights (no hub on that machine).
GPU1 = ROOT / "recipes" / "bench" / "stage1_gpu_vitb.yaml"
GPU2 = ROOT / "recipes" / "bench" / "stage2_gpu_vitb.yaml"
COMPILED = ["precision.compile_student=true", "precision.compile_teachers=true"]
GPU_CASES = {
    "gpu/stage1/bare/online": (GPU1, [], "bare", None),
    "gpu/stage1/sak/online": (GPU1, [], "sak", None),
    "gpu/stage1/sak/fp16-cache": (GPU1, [], "sak", "fp16"),
    "gpu/stage1/sak/int8-cache": (GPU1, [], "sak", "int8"),
    "gpu/stage1/sak/online/teachers-cast": (GPU1, ["precision.teacher_weights=cast"], "sak", None),
    "gpu/stage1/sak/online/compiled": (GPU1, COMPILED, "sak", None),
    # SAM's attention through FlexAttention (heads 64 wide) instead of folded into flash attention (192 wide)
    "gpu/stage1/sak/online/compiled/sam-flex": (GPU1, [*COMPILED, "teachers.2.options.attention=flex"], "sak", None),
    "gpu/stage1/sak/fp16-cache/compiled": (GPU1, COMPILED[:1], "sak", "fp16"),  # no teacher runs in training
    "gpu/stage1/sak/int8-cache/compiled": (GPU1, COMPILED[:1], "sak", "int8"),
    # batch k+1's cached maps copied to the GPU on a side stream during step k (sak/engine/prefetch.py)
    "gpu/stage1/sak/fp16-cache/compiled/prefetch": (
        GPU1,
        [*COMPILED[:1], "data.prefetch_to_device=true"],
        "sak",
        "fp16",
    ),
    # the recipe's default, data.prefetch_to_device: auto, which should read ahead here as /prefetch does
    "gpu/stage1/sak/fp16-cache/compiled/auto": (GPU1, COMPILED[:1], "sak", "fp16"),
    # the distillation loss compiled too (eager, its launches bound a cached step: benchmarks/student_step.py)
    "gpu/stage1/sak/online/compiled/losses": (GPU1, [*COMPILED, "precision.compile_losses=true"], "sak", None),
    "gpu/stage1/sak/fp16-cache/compiled/losses/prefetch": (
        GPU1,
        [*COMPILED[:1], "precision.compile_losses=true", "data.prefetch_to_device=true"],
        "sak",
        "fp16",
    ),
    # precision.compile_mode reduce-overhead: the compiled graphs replayed as CUDA graphs (one launch each)
    "gpu/stage1/sak/online/compiled/losses/cuda-graphs": (
        GPU1,
        [*COMPILED, "precision.compile_losses=true", "precision.compile_mode=reduce-overhead"],
        "sak",
        None,
    ),
    "gpu/stage1/sak/fp16-cache/compiled/losses/cuda-graphs/prefetch": (
        GPU1,
        [
            *COMPILED[:1],
            "precision.compile_losses=true",
            "precision.compile_mode=reduce-overhead",
            "data.prefetch_to_device=true",
        ],
        "sak",
        "fp16",
    ),  # fmt: skip
    "gpu/stage2/bare/online": (GPU2, [], "bare", None),
    "gpu/stage2/sak/online": (GPU2, [], "sak", None),
    "gpu/stage2/sak/fp16-cache": (GPU2, [], "sak", "fp16"),
    "gpu/stage2/sak/int8-cache": (GPU2, [], "sak", "int8"),
    "gpu/stage2/sak/online/1-teacher": (
        GPU2,
        ["teachers=[{name: dinov2, key: dinov2, image_size: 504, options: {size: base, source: timm}}]"],
        "sak",
        None,
    ),  # fmt: skip
    "gpu/stage2/sak/online/sam-at-512": (GPU2, ["teachers.2.image_size=512"], "sak", None),
    "gpu/stage2/sak/online/compiled": (GPU2, COMPILED, "sak", None),
    "gpu/stage2/sak/fp16-cache/compiled": (GPU2, COMPILED[:1], "sak", "fp16"),
    "gpu/stage2/sak/online/batch-2": (GPU2, ["data.batch_size=2"], "sak", None),
    "gpu/stage2/sak/online/batch-4": (GPU2, ["data.batch_size=4"], "sak", None),
    # the stem's blocks and adapters recomputed in backward: peak memory against gpu/stage2/sak/online, and the cost
    "gpu/stage2/sak/online/grad-checkpointing": (GPU2, ["student.grad_checkpointing=true"], "sak", None),
}
ALL_CASES = CASES | GPU_CASES
# dense bf16 tensor-core peak of the GPU, for model-FLOPs utilisation (datasheet, without sparsity), matched in
# this order against the device's name: the PCIe and NVL cards before the SXM ones ("NVIDIA H100 80GB HBM3")
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200 NVL": 835e12, "H200": 989e12,
             "A100": 312e12}  # fmt: skip


def peak_bf16(gpu: str | None) -> float | None:
    """The dense bf16 peak of the GPU named `gpu` (torch.cuda.get_device_name), or None when not in the table."""
    return next((v for k, v in PEAK_BF16.items() if gpu and k in gpu), None)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def flops(recipe) -> dict[str, float]:
    """Per-image FLOPs of the teachers' forward and of the student's forward + backward (2 images)."""
    torch.manual_seed(0)
    dev = device()
    # counted on the eager modules: compiling changes no FLOP, and would compile again for these 2 images
    eager = dataclasses.replace(
        recipe.precision, compile_teachers=False, compile_student=False, compile_losses=False, compile_mode="default"
    )
    # model FLOPs: without grad checkpointing's second forward of the blocks (that would be hardware FLOPs)
    student_config = dataclasses.replace(recipe.student, grad_checkpointing=False)
    recipe = dataclasses.replace(recipe, precision=eager, student=student_config)
    teachers = build_teachers(recipe, dev)
    tasks = build_tasks(recipe)
    student = build_student(recipe, teachers, tasks).train().to(dev)
    batch = next(iter(build_loader(recipe, recipe.data.split, train=True)))
    batch = {k: v[:2].to(dev) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    n = batch["image"].shape[0]
    # the teachers' own FLOPs: count SAM's attention as the model defines it, not the fused rewrite
    # (sak/teachers/sam_attention.py), whose padded, bias-folded head width would inflate the count
    for module in (m for t in teachers.values() for m in t.modules()):
        vars(module).pop("forward", None)
    with flop_counter() as counter:  # attention included on the CPU too (benchmarks/flops.py)
        targets = teacher_targets(teachers, batch["image"], None)
    teacher = counter.get_total_flops() / n
    with flop_counter() as counter:
        losses = compute_losses(student(batch["image"]), targets, batch, tasks, build_distill_loss(recipe), 1.0)
        losses.total.backward()
    del teachers, student, targets, losses
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"teacher_flops": teacher, "student_flops": counter.get_total_flops() / n}


def bare_loop(recipe, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """The same step with no framework. Returns each timed step's time, measured like the engine's
    `step_time` (from the batch's arrival on the device to the end of the optimiser and schedule steps, with one
    host sync per step: the engine reads its loss once a step), and its wall time (from the end of the step before,
    so the batch's loading included), which the engine's images_per_s measures with its logging included."""
    if recipe.precision.mixed == "fp16" or recipe.optim.grad_accum > 1:  # (it would run other work than the engine)
        raise ValueError("the bare loop runs bf16 or float32 students without gradient accumulation, as every case "
                         "here does; fp16 (a GradScaler) and optim.grad_accum > 1 are not written out in it")  # fmt: skip
    torch.manual_seed(recipe.run.seed)
    dev = device()
    if dev.type == "cpu" and recipe.run.tune_malloc:
        keep_freed_memory()  # as the engine does on the CPU, so that both loops run on the same allocator
    teachers = build_teachers(recipe, dev)
    tasks = build_tasks(recipe)
    student = build_student(recipe, teachers, tasks).train().to(dev)
    optimizer = build_optimizer(recipe, student)
    prepare_student(student, recipe.precision)
    loss_fn = build_distill_loss(recipe)
    normalizers = build_target_normalizers(recipe, teachers)  # loss.normalize, as the engine applies it
    if normalizers is not None:
        normalizers.to(dev)
    loader = build_loader(recipe, recipe.data.split, train=True)
    s, per_epoch = recipe.schedule, len(loader)  # the engine's schedule, stepped once a step as the engine steps it
    multiplier = lr_lambda(s.name, total_steps(recipe, per_epoch), warmup_steps(recipe, per_epoch), recipe.optim.lr,
                           s.min_lr, s.power)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    dtype, alpha = teacher_dtype(recipe), recipe.loss.alpha if tasks else 1.0
    times, walls, batches = [], [], iter(loader)

    def next_batch() -> dict:
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    upcoming = next_batch()
    last = time.perf_counter()
    for step in range(warmup + steps):
        # as Accelerate's loader: the batch's copy issued, the next batch fetched, then the batch handed over
        # (the copy runs while the loader is asked for the next one); the clock starts after that
        batch = {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in upcoming.items()}
        upcoming = next_batch()
        start = time.perf_counter()
        begin_step(recipe.precision.cuda_graphs)
        targets = teacher_targets(teachers, batch["image"], dtype)
        if normalizers is not None:
            normalizers.update(targets, step)
            targets = normalizers(targets)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=recipe.precision.mixed == "bf16"):
            out = student(batch["image"])
        losses = compute_losses(out, targets, batch, tasks, loss_fn, alpha)
        losses.total.backward()
        if recipe.optim.grad_clip is not None:  # clipped before the loss is read, as the engine clips
            torch.nn.utils.clip_grad_norm_(student.parameters(), recipe.optim.grad_clip)
        losses.total.item()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        times.append(end - start)
        walls.append(end - last)
        last = end
    sync()
    return times[warmup:], walls[warmup:]


def resident() -> dict[str, int]:
    """This process's resident memory now (KiB), split as Linux counts it: anonymous (the heap, tensors) and
    file-backed (mapped files, such as the cache's memory-mapped shards: page cache the kernel can reclaim).
    Empty where /proc is missing."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return {}
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) for k in ("RssAnon", "RssFile") if k in fields}


class PeakResident:
    """Samples `resident()` every 20 ms while active and keeps the peak of each kind: ru_maxrss alone
    cannot tell memory-mapped cache pages from the heap."""

    def __init__(self) -> None:
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for k, v in resident().items():
                self.peak[k] = max(self.peak.get(k, 0), v)

    def __enter__(self) -> PeakResident:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def gib(self) -> dict[str, float]:
        return {f"peak_rss_{k.removeprefix('Rss').lower()}_gib": v / 2**20 for k, v in self.peak.items()}


def _build_cache(recipe, root: Path, dtype: str) -> None:
    build_cache(recipe, root, dtype=dtype, shard_size=64, augment=True)


def run_case(name: str, steps: int, warmup: int) -> dict:
    recipe_path, overrides, loop, cache = ALL_CASES[name]
    if cache is not None and not name.endswith(("/prefetch", "/auto")):  # `auto` reads ahead on a GPU
        overrides = [*overrides, "data.prefetch_to_device=false"]
    with tempfile.TemporaryDirectory() as tmp:
        common = [
            f"run.output_dir={tmp}", f"schedule.max_steps={steps + warmup}", "schedule.warmup_steps=0",
            "logging.every=1", "logging.progress=false", "logging.wandb.mode=disabled", "checkpoint.every=0",
            "eval.at_start=false", *overrides,
        ]  # fmt: skip
        recipe = load_recipe(recipe_path, common)
        if name.startswith("gpu/"):  # exactly the images the timed steps use, so the cache holds no more
            common.append(f"data.options.length={(steps + warmup) * recipe.data.batch_size}")
            recipe = load_recipe(recipe_path, common)
        result = {"case": name, "global_batch": recipe.data.batch_size, "image_size": recipe.data.image_size}
        result.update(flops(recipe))
        if cache is not None:
            # what the trainer decides for this recipe on this machine (sak/engine/prefetch.py)
            p = recipe.data.prefetch_to_device
            result["reads_ahead"] = prefetch_enabled(p, device(), True, recipe.optim.grad_accum)
            start = time.perf_counter()
            # augment=True: the cache holds the training augmentation of epoch 0, i.e. exactly the samples the
            # online run trains on (every case runs less than one epoch), so the cosines compare like for like.
            # Built in a child process, so that this process's peak memory is the training's alone.
            root = Path(tmp) / "cache"
            child = multiprocessing.get_context("spawn").Process(target=_build_cache, args=(recipe, root, cache))
            child.start()
            child.join()
            if child.exitcode != 0:
                raise RuntimeError(f"building the {cache} cache failed (exit code {child.exitcode})")
            result["cache_build_s"] = time.perf_counter() - start
            result["cache_mib"] = sum(p.stat().st_size for p in root.rglob("*.safetensors")) / 2**20
            samples = json.loads((root / "manifest.json").read_text())["samples"]
            result["cache_mib_per_image"] = result["cache_mib"] / samples
            recipe = load_recipe(recipe_path, [*common, f"cache.path={root}"])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        with PeakResident() as memory:
            if loop == "bare":
                times, walls = bare_loop(recipe, steps, warmup)
            else:
                final = train(recipe)
        if loop != "bare":
            rows = [json.loads(x) for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
            times = [r["step_time"] for r in rows if "step_time" in r][warmup:]
            # the wall time between the ends of two steps: loading, the step, and the engine's logging (every
            # step here: logging.every=1)
            walls = [result["global_batch"] / r["images_per_s"] for r in rows if "images_per_s" in r][warmup:]
            result["val_cosine"] = {
                k.removeprefix("val/cosine/"): v for k, v in final.items() if k.startswith("val/cosine/")
            }
            # (in the JSON: each map's mean over the image taken away, the structure a plain cosine hides)
            result["val_spatial_cosine"] = {
                k.removeprefix("val/spatial_cosine/"): v
                for k, v in final.items()
                if k.startswith("val/spatial_cosine/")
            }
    # The loader's workers fill their queue (num_workers x 2 batches) during the warm-up: the first timed steps
    # take batches already loaded, whatever the loader's pace. The wall time is taken after them where at least
    # 3 steps remain; else the row says its wall rate may be the queue's (`wall_prefilled`: the batches in it).
    ahead = recipe.data.num_workers * 2
    if len(walls) - ahead >= 3:
        walls, result["wall_after_queue"] = walls[ahead:], ahead
    elif ahead:
        result["wall_prefilled"] = ahead
    result["wall_s"] = statistics.median(walls)
    result["wall_images_per_s"] = result["global_batch"] / result["wall_s"]
    result["step_s"] = statistics.median(times)
    result["images_per_s"] = result["global_batch"] / result["step_s"]
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result.update(memory.gib())
    if torch.cuda.is_available():
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        # the caching allocator keeps what it reserved (no empty_cache in a run): what it holds at the end is the
        # run's peak reservation, which the engine's resets of the peak counters leave out
        result["peak_gpu_reserved_gib"] = torch.cuda.memory_reserved() / 2**30
        if loop != "bare":  # the engine resets the counters at each row: the training steps' peak, then the eval's
            result["peak_gpu_gib"] = max(r["gpu_peak_gib"] for r in rows if "gpu_peak_gib" in r)
            result["peak_gpu_eval_gib"] = max(r["eval_gpu_peak_gib"] for r in rows if "eval_gpu_peak_gib" in r)
        result["gpu"] = torch.cuda.get_device_name()
        peak = peak_bf16(result["gpu"])
        if peak is not None:  # model-FLOPs utilisation of the work each image needs (teachers only when online)
            work = result["student_flops"] + (result["teacher_flops"] if cache is None else 0.0)
            result["mfu"] = work * result["images_per_s"] / peak
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--case", choices=sorted(ALL_CASES))
    parser.add_argument("--only", nargs="*", help="run only these cases of the suite")
    parser.add_argument("--out")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (at least 1)")
    parser.add_argument("--warmup", type=int, default=5, help="steps before the timed ones (0 or more)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of every case (at least 1); the fastest is reported"
    )
    parser.add_argument("--results", default=str(RESULTS), help="folder for NAME.{json,md}")
    parser.add_argument("--name", help="file name of the results (default throughput_<suite>: with --only, the "
                        "committed table of the suite is replaced by the cases run)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error(f"--steps must be at least 1, --warmup 0 or more and --repeats at least 1; got {args.steps}, "
                     f"{args.warmup} and {args.repeats}")  # fmt: skip
    if args.case and not args.out:
        parser.error("--case runs one case in this process and writes its row to --out FILE; give --out")
    if args.case:
        Path(args.out).write_text(json.dumps(run_case(args.case, args.steps, args.warmup)))
        return 0
    if args.suite == "gpu" and not torch.cuda.is_available():
        parser.error("--suite gpu needs a CUDA GPU")
    suite = GPU_CASES if args.suite == "gpu" else CASES
    unknown = [n for n in args.only or [] if n not in suite]
    if unknown:
        parser.error(f"--only: {unknown} are not cases of the {args.suite} suite; its cases: {', '.join(suite)}")
    names = list(args.only) if args.only else list(suite)  # --only: in its order
    stem = args.name or f"throughput_{args.suite}"
    runs: dict[str, list[dict]] = {name: [] for name in names}
    device_name = torch.cuda.get_device_name() if args.suite == "gpu" else f"CPU, {torch.get_num_threads()} threads"
    meta = {"device": device_name, "machine": platform.machine(), "torch": torch.__version__}
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.throughput " + " ".join(argv if argv is not None else sys.argv[1:])

    def write(done: bool = False) -> None:
        # the fastest repeat: interference from other work on the machine only ever adds time
        results = []
        for rs in runs.values():
            ok = [x for x in rs if "step_s" in x]
            if ok:
                results.append(min(ok, key=lambda x: x["step_s"]) | {"step_s_repeats": [x["step_s"] for x in ok]})
            elif rs:
                results.append(rs[-1])
        # the run's progress under .partial names, renamed over the committed results only once every case has
        # run: an interrupted `make bench` leaves them whole, not cut to the cases it reached
        part = "" if done else ".partial"
        write_text_whole(results_dir / f"{stem}{part}.json", json.dumps(meta | {"results": results}, indent=2))
        write_text_whole(results_dir / f"{stem}{part}.md", table(results, device_name, command, meta["torch"]))

    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # round robin, so that a slow spell of the machine hits every case alike
            for i, name in enumerate(names):
                out = Path(tmp) / f"{r}_{i}.json"
                cmd = [sys.executable, "-m", "benchmarks.throughput", "--case", name, "--out", str(out),
                       "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
                # the CPU suite on the CPU also where a GPU is present (its table is the CPU's)
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if args.suite == "cpu" else None
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
                    print(f"[{r + 1}/{args.repeats}] {name}: FAILED\n{proc.stderr[-3000:]}", flush=True)
                    runs[name].append({"case": name, "error": err})
                else:
                    runs[name].append(json.loads(out.read_text()))
                    print(f"[{r + 1}/{args.repeats}] {name}: {runs[name][-1]['step_s']:.4f} s/step", flush=True)
                write()
    write(done=True)
    for suffix in (".json", ".md"):
        (results_dir / f"{stem}.partial{suffix}").unlink(missing_ok=True)
    print((results_dir / f"{stem}.md").read_text())
    failed = [name for name, rs in runs.items() if not any("step_s" in x for x in rs)]
    if failed:
        print(f"[benchmarks.throughput] every run of {failed} failed (the errors are above and in the table)",
              file=sys.stderr)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
