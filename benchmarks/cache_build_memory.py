"""Peak host memory of `sak cache build` against the size of one shard: the build holds a shard's tensors in
host memory until it writes them, so its peak grows with `--shard-size`.

    python -m benchmarks.cache_build_memory            # writes results/cache_build_memory_cpu.{json,md}

Each build runs in a fresh Python process (its peak resident set, `ru_maxrss`, is its own): the tiny test
recipe's two random ViTs widened to 384 channels (ViT-S width, 4 blocks) at 224 px, generated images, one
shard of N samples in fp16, for two shard sizes. The difference between the two peaks, against the
difference between the two shards' sizes, is the number of shard copies the build holds at once.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
CHILD = """
import json, resource, sys
from pathlib import Path
from sak.config import load_recipe
from sak.engine.cache import build_cache

out, samples = Path(sys.argv[1]), int(sys.argv[2])
wide = [f"teachers.{i}.options.model_kwargs.{k}={v}" for i in (0, 1) for k, v in (("embed_dim", 384), ("num_heads", 6))]
recipe = load_recipe("tests/tiny.yaml", [f"run.output_dir={out.parent}", f"data.options.length={samples}",
                     "data.image_size=224", "teachers.0.image_size=224", "teachers.1.image_size=224", *wide])
build_cache(recipe, out, shard_size=samples, batch_size=8)
shard = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
print(json.dumps({"shard_mib": shard / 2**20, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def build(samples: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(Path(tmp) / "cache"), str(samples)], cwd=REPO,
                              capture_output=True, text=True, check=True)  # fmt: skip
    return {"samples": samples, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs=2, default=[64, 192], help="the two shard sizes")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder the JSON and markdown go to")
    args = parser.parse_args(argv)
    rows = [build(n) for n in args.samples]
    small, large = rows
    copies = (large["peak_rss_mib"] - small["peak_rss_mib"]) / (large["shard_mib"] - small["shard_mib"])
    result = {"torch": torch.__version__, "machine": platform.machine(), "rows": rows, "shard_copies": copies}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "cache_build_memory_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Cache build peak memory (CPU, torch {torch.__version__})",
        "",
        "Command: `python -m benchmarks.cache_build_memory`; see the module docstring. One fp16 shard of N samples,",
        "each build in a fresh process.",
        "",
        "| samples (one shard) | shard (MiB) | peak resident (MiB) |",
        "| --- | --- | --- |",
        *(f"| {r['samples']} | {r['shard_mib']:.1f} | {r['peak_rss_mib']:.0f} |" for r in rows),
        "",
        f"Peak growth per MiB of shard: {copies:.2f} (the shard copies held at once).",
    ]
    (args.results / "cache_build_memory_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
