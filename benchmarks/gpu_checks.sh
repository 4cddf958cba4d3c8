#!/usr/bin/env bash
# The GPU measurements of benchmarks/results/ (throughput_gpu, distill_loss_cuda, profile_gpu), in three
# parts that each fit one 10-minute call on a lent GPU machine (see docs/benchmarks.md):
#   bash benchmarks/gpu_checks.sh 1 OUT   # stage 1: online vs torch.compile'd vs the fp16 cache; cast teachers
#   bash benchmarks/gpu_checks.sh 2 OUT   # the loss rewrites on CUDA; stage 2: online vs compiled, options
#   bash benchmarks/gpu_checks.sh 3 OUT   # host vs GPU time per phase (profile_gpu); int8 cache (half the
#                                         # loader's bytes); the rows parts 1 and 2 missed
# OUT (default benchmarks/results) receives throughput_gpu.{json,md}, distill_loss_cuda.* (part 2) and
# profile_gpu.* (part 3). Each part stops itself before the call's limit; the cases finished by then are
# written. Parts 1 and 2 ran on 2026-11-26; part 3 has not run yet.
set -u
part=${1:?part 1, 2 or 3}
out=${2:-benchmarks/results}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, timm, accelerate; print("torch", torch.__version__, "timm", timm.__version__, "accelerate", accelerate.__version__)'
bench="python3 -m benchmarks.throughput --suite gpu --repeats 1 --steps 15 --warmup 5 --results $out --only"
case $part in
1) timeout "${LIMIT:-390}" $bench gpu/stage1/sak/online gpu/stage1/sak/online/compiled \
       gpu/stage1/sak/fp16-cache/compiled gpu/stage1/sak/fp16-cache gpu/stage1/sak/online/teachers-cast ;;
2) timeout 45 python3 -m benchmarks.distill_loss --results "$out"
   timeout "${LIMIT:-260}" $bench gpu/stage2/sak/online gpu/stage2/sak/online/compiled \
       gpu/stage2/sak/online/sam-at-512 gpu/stage2/sak/online/1-teacher ;;
3) timeout 240 python3 -m benchmarks.profile_gpu --steps 5 --rows 25 --json "$out/profile_gpu.json" \
       > "$out/profile_gpu.txt" 2>&1
   grep -A9 "^== " "$out/profile_gpu.txt"
   timeout "${LIMIT:-300}" $bench gpu/stage1/sak/online/compiled gpu/stage1/sak/int8-cache/compiled \
       gpu/stage1/sak/online/teachers-cast gpu/stage2/sak/online/1-teacher gpu/stage1/bare/online ;;
*) echo "part must be 1, 2 or 3" >&2; exit 2 ;;
esac
ls -la "$out"
