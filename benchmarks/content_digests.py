"""The content digest of a cache's training images on N processes: every process hashing every file (as sak
did before 2026-11-29) against each hashing every N-th file and the lists pooled (`content_digests(dataset,
shared=True)`, what `sak cache build` and training from a cache do).

    python -m benchmarks.content_digests            # writes results/content_digests_cpu.{json,md}

An image folder of `--files` random-byte files of `--kib` KiB each (their bytes are hashed, never decoded)
is written once; then `accelerate launch` starts `--processes` CPU processes, which time each way
`--repeats` times (pages cached after the first pass, so this measures hashing, not the disk: on a
shared file system the N-fold read that sharing saves is the larger cost). Reported: the median wall time
of the slowest process, per way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
CHILD = """
import json, statistics, sys, time
import torch.distributed as dist
from accelerate import PartialState
from sak.data import DatasetSpec, build_dataset
from sak.engine.cache import content_digests

state = PartialState(cpu=True)
dataset = build_dataset("image_folder", DatasetSpec(root=sys.argv[1], split="train", image_size=32), {})
times = {"every process hashes every file": [], "each hashes every N-th file, pooled": []}
digests = {}
for _ in range(int(sys.argv[2])):
    for shared, way in zip((False, True), times):
        state.wait_for_everyone()
        start = time.perf_counter()
        digests[shared] = content_digests(dataset, shared=shared)
        times[way].append(time.perf_counter() - start)
assert digests[False] == digests[True]
rows = [None] * state.num_processes
dist.all_gather_object(rows, times)
if state.is_main_process:
    print(json.dumps({way: statistics.median(max(r[way][k] for r in rows) for k in range(len(times[way])))
                      for way in times}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--kib", type=int, default=110, help="file size (PASCAL-Context's JPEGs average ~110 KiB)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder the JSON and markdown go to")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "train"
        folder.mkdir()
        for i in range(args.files):
            (folder / f"im{i:06d}.jpg").write_bytes(os.urandom(args.kib * 1024))
        script = Path(tmp) / "child.py"
        script.write_text(CHILD)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(args.processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(script), tmp, str(args.repeats)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    seconds = json.loads(proc.stdout.strip().splitlines()[-1])
    before, after = seconds.values()
    result = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "files": args.files,
        "kib": args.kib,
        "processes": args.processes,
        "median_seconds": seconds,
        "speedup": before / after,
        "command": "python -m benchmarks.content_digests " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "content_digests_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Content digests on {args.processes} processes (CPU, {os.cpu_count()} cores, torch {torch.__version__})",
        "",
        f"{args.files} files of {args.kib} KiB, pages cached; median of {args.repeats} of the slowest process.",
        "",
        "| way | seconds |",
        "| --- | --- |",
        *(f"| {way} | {s:.3f} |" for way, s in seconds.items()),
        "",
        f"Speed-up: {before / after:.2f}x. Reproduce: `{result['command'].strip()}`.",
        "",
    ]
    (args.results / "content_digests_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
