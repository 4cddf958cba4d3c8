#!/usr/bin/env bash
# The GPU measurements of benchmarks/results/ (throughput_gpu, distill_loss_cuda, profile_gpu, cache_loader_gpu),
# in parts that each fit one 10-minute call on a lent GPU machine (see docs/benchmarks.md):
#   bash benchmarks/gpu_checks.sh 1 OUT   # stage 1: online vs torch.compile'd vs the fp16 cache; cast teachers
#   bash benchmarks/gpu_checks.sh 2 OUT   # the loss rewrites on CUDA; stage 2: online vs compiled, options
#   bash benchmarks/gpu_checks.sh 3 OUT   # the prefetcher's and heads' gpu tests; stage 1 compiled online vs the
#                                         # compiled fp16 cache without and with data.prefetch_to_device (cache
#                                         # speed-up and MFU after the traffic cuts)
#   bash benchmarks/gpu_checks.sh 4 OUT   # host vs GPU time per phase (profile_gpu); stage 1 bare loop vs sak
#                                         # engine, eager (framework overhead; no host waits since part 1)
#   bash benchmarks/gpu_checks.sh 5 OUT   # the loss on CUDA again (upsampled_cosine, into OUT/loss/); the cached
#                                         # loader alone (fp16, 4 workers, pinned) and its copy to the GPU; stage 2 bare
#                                         # vs sak engine, and with 1 teacher
#   bash benchmarks/gpu_checks.sh 6 OUT   # the compiled fp16 cache with data.prefetch_to_device true and with
#                                         # the default auto (which should read ahead there too); not run yet
#   bash benchmarks/gpu_checks.sh 7 OUT   # sak cache build over 128 JPEG files with 0 and 4 loader workers, the
#                                         # GPU recipes' teachers and a small ViT (cache_build_gpu; 4 GiB a build
#                                         # of the GPU set, deleted once timed; 2-4 minutes, each row written as
#                                         # it is measured; not run yet: on 2026-11-27 it asked for the demo's
#                                         # teachers, whose packages the machine lacks; the JPEG files are cut
#                                         # from the demo's photographs: scikit-image, scikit-learn and
#                                         # matplotlib must be installed)
#   bash benchmarks/gpu_checks.sh 8 OUT   # the stage-1 cached step part by part, eager and compiled: the ViT alone,
#                                         # + adapter paths, + losses, + optimiser (student_step_cuda): where the
#                                         # cached step loses the teachers' rate; stage 2 without and with
#                                         # student.grad_checkpointing (peak memory); about 6 minutes
#   bash benchmarks/gpu_checks.sh 9 OUT   # SAM-B's relative-position attention at 1024 px, batch 16, bf16: written
#                                         # out, folded (the default) and FlexAttention, alone and in the encoder
#                                         # (sam_attention_cuda; 3-5 minutes with the kernels compiling, so
#                                         # it fits beside any part; 50 s on 2026-11-27 after part 10, run
#                                         # again that day with v narrow on CUDA, beside a `folded, v padded` row)
#   bash benchmarks/gpu_checks.sh 10 OUT  # the compiled stage-1 online step with SAM's attention folded (the
#                                         # default) and through FlexAttention: what part 9's kernel does to the
#                                         # step and its MFU; about 5 minutes
#   bash benchmarks/gpu_checks.sh 11 OUT  # after the 2026-11-27 run: the gpu tests of the routers' mixing and
#                                         # SAM's attention with v narrow; the routers' mixing, batched product vs
#                                         # multiply-adds (router_mix_cuda; written at its end); stage 2 eager
#                                         # and compiled (into OUT/stage2/); about 6 minutes. Run part 9 again
#                                         # beside it (about 1 minute once part 11 has compiled)
#   bash benchmarks/gpu_checks.sh 12 OUT  # the adapter paths one after another vs batched (adapter_paths_cuda;
#                                         # whether batching them would pay); precision.compile_losses: stage 1
#                                         # compiled online and from the fp16 cache (read ahead), both with it
#                                         # (the cached step part by part with it moved to part 13); about 7
#                                         # minutes
#   bash benchmarks/gpu_checks.sh 13 OUT  # precision.compile_mode reduce-overhead (CUDA graphs): its gpu test
#                                         # (training equals eager training; 2 tiny compiled runs, 2 eager),
#                                         # then the cached step part by part with the losses compiled, in the
#                                         # default mode (student_step_cuda_compiled_losses, with the kernels of
#                                         # 3 compiled steps: ..._profile.txt) and with CUDA graphs
#                                         # (student_step_cuda_graphs), one call; about 9 minutes. Ran on
#                                         # 2026-11-27 in another form (the test cut off at 120 s, stage 1
#                                         # online compiled/losses, student_step with CUDA graphs):
#                                         # throughput_gpu_h200_part13, student_step_cuda_graphs
#   bash benchmarks/gpu_checks.sh 14 OUT  # stage 1 with CUDA graphs, online and from the fp16 cache (read
#                                         # ahead): the cache speed-up and MFU with them; about 9 minutes
#   bash benchmarks/gpu_checks.sh 15 OUT  # the cached maps read by the pin-memory thread (since 2026-11-27):
#                                         # its gpu test (page-locked batches, 0 and 2 workers), then the loader
#                                         # alone over the fp16 cache with 4 and 8 workers and one batch's host
#                                         # copies, page-locked included (cache_loader_gpu; gather_pinned_s);
#                                         # about 5 minutes. Run it before part 14, whose cached case it feeds
#   bash benchmarks/gpu_checks.sh 16 OUT  # every gpu-marked test (the 8 files), then the framework overhead again
#                                         # (bare loop vs sak engine, eager, stage 1 then stage 2 into OUT/stage2/)
#                                         # since the engine steps the schedule on every step (2026-11-29); about
#                                         # 8 minutes
#   bash benchmarks/gpu_checks.sh 17 OUT  # part 16's framework overhead with 30 steps, run round robin: stage 1
#                                         # three times, stage 2 twice (into OUT/stage2/); about 7 minutes
#   bash benchmarks/gpu_checks.sh 18 OUT  # parts 16's tests and 17 in one call (part 16's single overhead runs
#                                         # left out: part 17's round robin supersedes them); about 9 minutes,
#                                         # for a task whose 15 minutes hold one call
#   bash benchmarks/gpu_checks.sh 19 OUT  # the PHI-S normalisers of the GPU configuration (target_normalizer_cuda:
#                                         # statistics in float32 on centred tokens since 2026-11-30, 10.8 ms a
#                                         # step in float64 before), then the gpu test of metrics.jsonl's
#                                         # gpu_peak_gib (2026-11-30); about a minute, to run beside any part
# Parts 3-6 are each about 6 minutes of device time, so that one task's 15 minutes (machine start included)
# holds two of them: run them in order. A cache speed-up needs the online row of the same configuration in
# the same part (throughput.py pairs `.../fp16-cache/X` with `.../online/X`, `/prefetch` or `/auto`
# dropped), and the framework overhead needs the bare and sak rows of one stage in one part; part 6 compares
# its two rows with each other (wall images/s), not with an online row.
# OUT (required: a folder outside benchmarks/results, whose throughput_gpu.{json,md} are the committed H100 results)
# receives throughput_gpu.{json,md} (throughput_gpu.partial.{json,md} when a part's limit stopped the benchmark:
# the cases finished by then), distill_loss_cuda.* (part 2; part 5
# into OUT/loss/), cache_loader_gpu.* (part 5), profile_gpu.* (part 4), cache_build_gpu.* (part 7) and
# student_step_cuda.* (part 8), sam_attention_cuda.* (part 9), router_mix_cuda.* (part 11) and
# adapter_paths_cuda.* (part 12). Each part stops itself before the call's limit; throughput.py writes the
# cases finished by then, the other benchmarks (router_mix, adapter_paths, cache_loader, ...) only at their
# end. Parts 1 and 2 ran on 2026-11-26 (H100); part 3 and part 4's throughput pair ran on 2026-11-26 on an H200
# (throughput_gpu_h200.md): part 3's three compiled cases took 120, 190 and 114 s on a fresh machine (each
# cached case builds its 10 GB cache, about 60 s), more than its 300 s, so its two cached cases were run
# again in a second call. On 2026-11-27 (H200) parts 10 and 9 ran in one call (306 s, machine start not
# counted), then part 8 (191 s), part 4's profile (42 s) and part 5's loader (its fp16 half only, before
# the limit); results in throughput_gpu_h200_part{10,8}, sam_attention_cuda, student_step_cuda,
# profile_gpu_h200. A later call that day (H200, 150 s) ran part 11 with LIMIT=1 (its tests and router_mix, not
# its stage 2) and part 9 again; a third (582 s) part 13 as it then was. On 2026-11-29 (H200) parts 16 and 17 ran
# (results in throughput_gpu_h200_part{16,17}*, gpu_tests_h200_2026-11-29.txt), and stage 2's batch-2, batch-4
# and grad-checkpointing rows (throughput_gpu_h200_stage2_memory), all before the noisy routers came to draw
# their training noise per token (later that day). On 2026-11-30 (H200) part 18 ran (430 s; results in
# throughput_gpu_h200_part18*, gpu_tests_h200_2026-11-30.txt), then part 15's loader with 8 workers alone
# (210 s; cache_loader_gpu_h200). Still to run: part 14 (with part 19 beside it), part 13's benchmarks (its
# test ran in parts 16 and 18), 12, 5's loader, 6, 7 and part 11's stage 2.
# throughput_gpu.{json,md} hold the cases of the last part run: keep the earlier part's files before the next.
# Each throughput case times 30 steps after 5 of warm-up: the GPU recipes' 8 workers queue 16 batches during the
# warm-up, and only the steps after those time the loader's pace (15 steps, as before 2026-11-29, left none:
# every wall rate was the queue's, marked (q)). The script exits non-zero when any command failed or hit its
# limit (the results of the commands before are kept).
set -u -o pipefail
failed=0
trap 'failed=1' ERR
part=${1:?part 1 to 19}
out=${2:?an OUT folder for the results (not benchmarks/results)}
mkdir -p "$out" "$out/loss"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, timm, accelerate; print("torch", torch.__version__, "timm", timm.__version__, "accelerate", accelerate.__version__)'
bench="python3 -m benchmarks.throughput --suite gpu --repeats 1 --steps 30 --warmup 5 --results $out --only"
case $part in
1) timeout "${LIMIT:-390}" $bench gpu/stage1/sak/online gpu/stage1/sak/online/compiled \
       gpu/stage1/sak/fp16-cache/compiled gpu/stage1/sak/fp16-cache gpu/stage1/sak/online/teachers-cast ;;
2) timeout 45 python3 -m benchmarks.distill_loss --results "$out"
   timeout "${LIMIT:-260}" $bench gpu/stage2/sak/online gpu/stage2/sak/online/compiled \
       gpu/stage2/sak/online/sam-at-512 gpu/stage2/sak/online/1-teacher ;;
3) timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_prefetch.py tests/student/test_heads.py
   timeout "${LIMIT:-300}" $bench gpu/stage1/sak/online/compiled gpu/stage1/sak/fp16-cache/compiled \
       gpu/stage1/sak/fp16-cache/compiled/prefetch ;;
4) timeout 200 python3 -m benchmarks.profile_gpu --steps 5 --rows 25 --json "$out/profile_gpu.json" \
       > "$out/profile_gpu.txt" 2>&1
   grep -A9 "^== " "$out/profile_gpu.txt"
   timeout "${LIMIT:-170}" $bench gpu/stage1/bare/online gpu/stage1/sak/online ;;
5) timeout 45 python3 -m benchmarks.distill_loss --results "$out/loss"
   # 16 batches an epoch against the 8 that 4 workers keep in flight (192 images and 8 workers, as run on
   # 2026-11-27, gave 12 against 16: the case the benchmark's docstring warns of); fp16 only (the int8 cache
   # did not fit the limit; the results are written at the end)
   timeout 200 python3 -m benchmarks.cache_loader --images 256 --workers 4 --epochs 3 --dtypes fp16 \
       --results "$out" --name cache_loader_gpu
   timeout "${LIMIT:-200}" $bench gpu/stage2/bare/online gpu/stage2/sak/online gpu/stage2/sak/online/1-teacher ;;
6) timeout "${LIMIT:-330}" $bench gpu/stage1/sak/fp16-cache/compiled/prefetch gpu/stage1/sak/fp16-cache/compiled/auto ;;
7) timeout 300 python3 -m benchmarks.cache_build --images 128 --workers 0 4 --teachers gpu small --results "$out" \
       --name cache_build_gpu ;;
8) timeout 330 python3 -m benchmarks.student_step --recipe recipes/bench/stage1_gpu_vitb.yaml --steps 15 --warmup 5 \
       --results "$out"
   timeout "${LIMIT:-150}" $bench gpu/stage2/sak/online gpu/stage2/sak/online/grad-checkpointing ;;
9) timeout 300 python3 -m benchmarks.sam_attention --image-size 1024 --batch 16 --results "$out" ;;
10) timeout "${LIMIT:-330}" $bench gpu/stage1/sak/online/compiled gpu/stage1/sak/online/compiled/sam-flex ;;
11) timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/student/test_router.py \
        tests/teachers/test_sam_attention_gpu.py
    timeout 150 python3 -m benchmarks.router_mix --results "$out"
    mkdir -p "$out/stage2"
    timeout "${LIMIT:-300}" python3 -m benchmarks.throughput --suite gpu --repeats 1 --steps 30 --warmup 5 \
        --results "$out/stage2" --only gpu/stage2/sak/online gpu/stage2/sak/online/compiled ;;
12) timeout 120 python3 -m benchmarks.adapter_paths --batch 16 --tokens 577 --results "$out"
    timeout "${LIMIT:-450}" $bench gpu/stage1/sak/online/compiled/losses gpu/stage1/sak/fp16-cache/compiled/losses/prefetch ;;
13) timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_compile_gpu.py
    step="python3 -m benchmarks.student_step --recipe recipes/bench/stage1_gpu_vitb.yaml --steps 15 --warmup 5"
    timeout 170 $step --profile --results "$out" --name student_step_cuda_compiled_losses precision.compile_losses=true
    timeout 170 $step --results "$out" --name student_step_cuda_graphs precision.compile_student=true \
        precision.compile_losses=true precision.compile_mode=reduce-overhead ;;
14) timeout "${LIMIT:-560}" $bench gpu/stage1/sak/online/compiled/losses/cuda-graphs \
        gpu/stage1/sak/fp16-cache/compiled/losses/cuda-graphs/prefetch ;;
15) timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_cache_gpu.py
    # 32 batches an epoch: 8 workers keep 16 in flight (256 images would be the case the benchmark warns of)
    timeout 300 python3 -m benchmarks.cache_loader --images 512 --workers 4 8 --epochs 3 --dtypes fp16 \
        --results "$out" --name cache_loader_gpu ;;
16) timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_prefetch.py \
        tests/engine/test_cache_gpu.py tests/engine/test_compile_gpu.py tests/engine/test_export.py \
        tests/student/test_router.py tests/student/test_heads.py tests/teachers/test_sam_attention_gpu.py \
        tests/engine/test_gpu_peak.py
    timeout "${LIMIT:-160}" $bench gpu/stage1/bare/online gpu/stage1/sak/online
    mkdir -p "$out/stage2"
    timeout "${LIMIT:-150}" python3 -m benchmarks.throughput --suite gpu --repeats 1 --steps 30 --warmup 5 \
        --results "$out/stage2" --only gpu/stage2/bare/online gpu/stage2/sak/online ;;
17) rr="python3 -m benchmarks.throughput --suite gpu --steps 30 --warmup 5"
    timeout 250 $rr --repeats 3 --results "$out" --only gpu/stage1/bare/online gpu/stage1/sak/online
    mkdir -p "$out/stage2"
    timeout 180 $rr --repeats 2 --results "$out/stage2" --only gpu/stage2/bare/online gpu/stage2/sak/online ;;
18) timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_prefetch.py \
        tests/engine/test_cache_gpu.py tests/engine/test_compile_gpu.py tests/engine/test_export.py \
        tests/student/test_router.py tests/student/test_heads.py tests/teachers/test_sam_attention_gpu.py \
        tests/engine/test_gpu_peak.py \
        2>&1 | tee "$out/gpu_tests.txt"
    rr="python3 -m benchmarks.throughput --suite gpu --steps 30 --warmup 5"
    timeout 240 $rr --repeats 3 --results "$out" --only gpu/stage1/bare/online gpu/stage1/sak/online
    mkdir -p "$out/stage2"
    timeout 170 $rr --repeats 2 --results "$out/stage2" --only gpu/stage2/bare/online gpu/stage2/sak/online ;;
19) timeout 120 python3 -m benchmarks.target_normalizer --device-costs cuda --results "$out"
    timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_gpu_peak.py ;;
*) echo "part must be 1 to 19" >&2; exit 2 ;;
esac
ls -la "$out"
exit $failed
