"""The teachers' adapter paths, forward and backward, one path after another (as the student runs them) or
the T paths batched into one product per adapter:

    python -m benchmarks.adapter_paths                                  # CPU: ViT-B width, 192 px, batch 4
    python -m benchmarks.adapter_paths --batch 16 --tokens 577          # the GPU stage-1 recipe (bf16 on CUDA)

On an H200 the student's forward beyond its ViT (the three adapter paths of the stage-1 GPU recipe, 3
teachers x 13 bottleneck adapters, 768 -> 192 -> 768, on 16 x 577 tokens, with the aligners and maps) added
25 ms to a 58 ms compiled cached step for 10% of its FLOPs (benchmarks/results/student_step_cuda.md); the
paths alone cost at most that. This times them alone, with the student's own modules
(`sak.student.adapters.TeacherSpecificAdapterPath`, default adapter), fed random stem tokens:

- `per path`: each teacher's path in turn, as `SAKStudent.forward` runs them: 3 x 13 adapters, each two
  small products;
- `batched`: the same parameters stacked at every call (T down- and up-projections into one (T, ., .)
  product each; the LayerNorms' affine parts stacked too), the paths' tokens kept as one (T, B, N, D)
  tensor: a third of the launches, products three times as large. Not what the student runs: this
  measures whether it would pay.

Each eager and torch.compile'd (unless --no-compile), under bf16 autocast on CUDA and in float32 on the
CPU; backward of the mean square of every level's output; the median of the repeats after warm-up. The
two ways' outputs are compared (largest absolute difference). Writes
benchmarks/results/adapter_paths_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from sak.student.adapters import TeacherSpecificAdapterPath

from .ways import add_arguments, header, time_ways, ways_table, write_results

RESULTS = Path(__file__).resolve().parent / "results"


def per_path(paths: list[TeacherSpecificAdapterPath], embedded: Tensor, blocks: list[Tensor]) -> list[Tensor]:
    return [level for path in paths for level in path(embedded, blocks)]


def batched(paths: list[TeacherSpecificAdapterPath], embedded: Tensor, blocks: list[Tensor]) -> list[Tensor]:
    """What `per_path` computes, every adapter of one depth (and every LayerNorm of one level) over the T paths
    at once; outputs in the same order (path by path, level by level)."""
    t, (b, n, d) = len(paths), embedded.shape

    def adapt(depth: int, x: Tensor) -> Tensor:  # x (T, B, N, D)
        adapters = [p.adapters[depth] for p in paths]
        w_down = torch.stack([a.down.weight for a in adapters])  # (T, H, D)
        b_down = torch.stack([a.down.bias for a in adapters])
        w_up = torch.stack([a.up.weight for a in adapters])  # (T, D, H)
        b_up = torch.stack([a.up.bias for a in adapters])
        scale = torch.stack([a.scale for a in adapters])  # (T, 1)
        flat = x.reshape(t, b * n, d)
        hidden = F.gelu(torch.baddbmm(b_down[:, None], flat, w_down.transpose(1, 2)))
        up = torch.baddbmm(b_up[:, None], hidden, w_up.transpose(1, 2))
        return x + scale[:, None, None] * up.view(t, b, n, d)

    levels = paths[0].levels
    path = adapt(0, embedded.expand(t, b, n, d))
    out: list[list[Tensor]] = [[] for _ in range(t)]
    for i, tas in enumerate(blocks):
        path = adapt(i + 1, path + tas)
        if i in levels:
            norms = [p.norms[levels.index(i)] for p in paths]
            normed = F.layer_norm(path, (d,), eps=norms[0].eps)
            weight = torch.stack([m.weight for m in norms])[:, None, None]
            bias = torch.stack([m.bias for m in norms])[:, None, None]
            for j, level in enumerate((normed * weight + bias).unbind(0)):
                out[j].append(level)
    return [level for levels in out for level in levels]


def rows(args, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    levels = [2, 5, 8, 11]
    paths = [TeacherSpecificAdapterPath(args.dim, args.depth, levels).to(device) for _ in range(args.paths)]
    with torch.no_grad():  # give every parameter some weight (the scales start at 1, biases at 0)
        for p in (q for path in paths for q in path.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    shape = (args.batch, args.tokens, args.dim)
    embedded = torch.randn(shape, device=device, requires_grad=True)
    blocks = [torch.randn(shape, device=device, requires_grad=True) for _ in range(args.depth)]
    params = [q for path in paths for q in path.parameters()]
    ways = {"per path": per_path, "batched": batched}
    if args.compile:
        ways |= {f"{name}, compiled": torch.compile(fn) for name, fn in list(ways.items())}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        reference = [x.float() for x in per_path(paths, embedded, blocks)]

    def step(fn) -> None:
        with autocast:
            levels = fn(paths, embedded, blocks)
        sum(x.float().square().mean() for x in levels).backward()
        for q in (embedded, *blocks, *params):
            q.grad = None

    def outputs(fn) -> list[Tensor]:
        with autocast:
            return fn(paths, embedded, blocks)

    return time_ways(ways, step, outputs, reference, device, args.repeats, args.warmup)


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [
        f"# The teachers' adapter paths, forward + backward ({result['device']}, torch {result['torch']})",
        "",
        f"Command: `{result['command']}`. {a['paths']} paths of {a['depth'] + 1} bottleneck adapters "
        f"({a['dim']} -> {a['dim'] // 4} -> {a['dim']}) on ({a['batch']}, {a['tokens']}, {a['dim']}) tokens, "
        f"{result['dtype']}; median of {a['repeats']} after {a['warmup']} (see the docstring of "
        "benchmarks/adapter_paths.py). Difference: largest absolute difference of the outputs from the "
        "per-path forward's.",
        "",
        *ways_table(result["rows"]),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=145, help="prefix + patch tokens (577 at 384 px)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--depth", type=int, default=12, help="stem blocks (adapters: depth + 1)")
    parser.add_argument("--paths", type=int, default=3)
    add_arguments(parser, RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result = header("adapter_paths", argv, args, device) | {
        "dtype": "bf16 autocast" if device.type == "cuda" else "float32",
        "rows": rows(args, device),
    }
    write_results(args.results, f"adapter_paths_{device.type}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
