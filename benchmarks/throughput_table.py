"""The markdown table of benchmarks/throughput.py: per case, step time, images/s, memory, held-out cosine, and
for cached cases the speed-up over the online run of the same configuration with its share of two bounds."""

from __future__ import annotations

import torch


def table(results: list[dict], device: str, command: str, torch_version: str | None = None) -> str:
    """`torch_version`: the one the results were measured with (their JSON's `torch`; default: this one)."""
    by = {r["case"]: r for r in results}
    gpu = any("peak_gpu_gib" in r for r in results)
    lines = [
        f"# Training-step throughput ({device}, torch {torch_version or torch.__version__})",
        "",
        f"Command: `{command}`. Median step time after warm-up (from the batch's arrival to the end of the",
        "optimiser step, data loading excluded), the fastest of the repeats (run round robin); peak memory of the",
        "case's own process (a cache is built in a child process beforehand, so this is the training's peak;",
        "beside it the peaks of anonymous memory and of mapped files, such as the cache's shards, sampled every",
        "20 ms);",
        "held-out cosine per teacher after the same number of steps, plain / spatial (spatial: each map's mean",
        "over the image taken away first, so the structure, which a plain cosine of mean-dominated maps hides;",
        "`val/spatial_cosine` in docs/architecture.md). Wall images/s counts",
        "every second between the ends of two steps, data loading (and the engine's logging) included. The",
        "cache speed-up compares wall images/s of the",
        "cached and the online run: the training loader reads the cache, so a step time without data loading",
        "would leave the reads out. Two bounds: the FLOP bound (teacher + student step FLOPs) / student step",
        "FLOPs, which assumes the student step turns FLOPs into time at the teachers' rate, and the step bound,",
        "online step time / cached step time, which a loader that never keeps the step waiting would reach.",
        "",
    ]
    if gpu:
        lines += [
            "MFU: the FLOPs each image needs (student forward + backward, plus the teachers' forward when they run",
            "online), times images/s, over the GPU's dense bf16 peak (datasheet, without sparsity: 989 TFLOP/s for",
            "the H100 SXM and H200, 835 for their NVL cards, 756 for the H100 PCIe; benchmarks/throughput.py).",
            "Peak GPU: torch.cuda.max_memory_allocated over the training steps (the engine's `gpu_peak_gib`; the",
            "final evaluation's peak apart, `peak_gpu_eval_gib` in the JSON; before 2026-11-30 one peak over both).",
            "",
            "| case | batch | step (s) | images/s | wall images/s | peak GPU (GiB) | MFU | cache MiB/image "
            "| cache speed-up | FLOP bound (share) | step bound (share) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
    else:
        lines += [
            "| case | step (s) | images/s | wall images/s | peak RSS GiB (anon, file) | held-out cosine "
            "| cache speed-up | FLOP bound (share) | step bound (share) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error']} |")
            continue
        cos = cosines(r, 3)
        speed = "- | - | -"
        # the online run of the same configuration; prefetching only changes how cached batches are loaded
        ahead = "/prefetch" in r["case"] or r.get("reads_ahead")
        base = by.get(r["case"].replace("/prefetch", "").replace("/auto", "")) if ahead else r
        online = by.get(
            r["case"]
            .replace("fp16-cache", "online")
            .replace("int8-cache", "online")
            .replace("/prefetch", "")
            .replace("/auto", "")
        )
        if "cache" in r["case"] and online is not None and "wall_images_per_s" in online:
            achieved = r["wall_images_per_s"] / online["wall_images_per_s"]
            flop_bound = (r["teacher_flops"] + r["student_flops"]) / r["student_flops"]
            # a read-ahead row's step time includes its wait for the batch's copy: its bound is the cached step's
            # without read-ahead, where the same part measured one, and not given where it did not
            step = f"{online['step_s'] / base['step_s']:.2f}x" if base is not None and "step_s" in base else None
            speed = f"{achieved:.2f}x | {flop_bound:.2f}x ({achieved / flop_bound:.0%}) | " + (
                f"{step} ({achieved / (online['step_s'] / base['step_s']):.0%})"
                if step
                else "- (no row without read-ahead)"
            )
        wall = f"{r['wall_images_per_s']:.1f}" if "wall_images_per_s" in r else "-"
        wall += " (q)" if r.get("wall_prefilled") else ""
        rss = f"{r['peak_rss_gib']:.2f}"
        if "peak_rss_anon_gib" in r and "peak_rss_file_gib" in r:
            rss += f" ({r['peak_rss_anon_gib']:.2f}, {r['peak_rss_file_gib']:.2f})"
        if gpu:
            mfu = f"{r['mfu']:.0%}" if "mfu" in r else "-"
            per_image = f"{r['cache_mib_per_image']:.1f}" if "cache_mib_per_image" in r else "-"
            lines.append(
                f"| {r['case']} | {r['global_batch']} | {r['step_s']:.4f} | {r['images_per_s']:.1f} | {wall} "
                f"| {r['peak_gpu_gib']:.1f} | {mfu} | {per_image} | {speed} |"
            )
        else:
            lines.append(
                f"| {r['case']} | {r['step_s']:.4f} | {r['images_per_s']:.1f} | {wall} | {rss} | {cos} | {speed} |"
            )
    queued = [f"{r['case']} ({r['wall_prefilled']} batches)" for r in results if r.get("wall_prefilled")]
    if queued:  # fewer timed steps than the loader's queue holds, plus 3: its rate is not measured
        lines.append(
            "\n(q): wall images/s of steps that may all have taken batches the loader's workers had queued during "
            f"the warm-up, so not the loader's pace (give more --steps than the queue holds, plus 3): {', '.join(queued)}"
        )
    ahead = [r["case"] for r in results if r.get("reads_ahead")]
    if ahead:  # data.prefetch_to_device resolved as the trainer resolves it (true, or auto on a CUDA device)
        lines.append(f"\nCached rows reading the next batch onto the device during the step: {', '.join(ahead)}")
    for stage in ("stage1", "stage2", "gpu/stage1", "gpu/stage2"):
        bare, sak = by.get(f"{stage}/bare/online"), by.get(f"{stage}/sak/online")
        if bare and sak and "step_s" in bare and "step_s" in sak:
            step = f"step time = {sak['step_s'] / bare['step_s']:.3f}"
            if "wall_s" in bare and "wall_s" in sak:  # (results written before 2026-11-27 have no bare wall time)
                # the wall ratio is the overhead: neither step clock waits for the GPU work a step leaves queued
                # (its optimiser step), which the engine's logging hides and the bare loop's next step pays for
                lines.append(
                    f"\n{stage}: sak engine / bare loop wall time a step = {sak['wall_s'] / bare['wall_s']:.3f} "
                    f"(the framework overhead: data loading and the engine's logging every step included); {step}"
                )
            else:
                lines.append(f"\n{stage}: sak engine / bare loop {step}")
    for r in results:  # the size target: int8 at most 30% of float32 (twice the fp16 cache's bytes)
        fp16 = by.get(r["case"].replace("int8-cache", "fp16-cache"))
        if "int8-cache" in r["case"] and fp16 and "cache_mib_per_image" in r and "cache_mib_per_image" in fp16:
            fp32 = 2 * fp16["cache_mib_per_image"]
            lines.append(
                f"\n{r['case']}: {r['cache_mib_per_image']:.3f} MiB an image on disk, "
                f"{r['cache_mib_per_image'] / fp32:.1%} of float32 ({fp32:.3f} MiB: twice the fp16 cache's; target <= 30%)"
            )
    if gpu:
        lines.append(
            "\nHeld-out cosine (random-weight teachers, so only a check that cached and online training agree):"
        )
        lines += [f"- {r['case']}: {cos}" for r in results if (cos := cosines(r, 4)) != "-"]
    return "\n".join(lines) + "\n"


def cosines(result: dict, digits: int) -> str:
    """Per teacher: the held-out plain cosine, and the spatial one after a slash where the result has it
    (results written before 2026-11-29 have only the plain)."""
    spatial = result.get("val_spatial_cosine", {})
    return (
        ", ".join(
            f"{k} {v:.{digits}f}" + (f" / {spatial[k]:.{digits}f}" if k in spatial else "")
            for k, v in result.get("val_cosine", {}).items()
        )
        or "-"
    )
