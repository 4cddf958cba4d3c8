"""The stage-2 routers' mixing of experts, forward and backward, at the GPU recipe's shapes:

    python -m benchmarks.router_mix [--batch 8] [--tokens 1024] [--no-compile] [--per-token]

At every level each task mixes E = T + 1 experts (the TAS tokens and the T teachers' path tokens, (B, N, D)
float32 under autocast) with its router's per-image weights (B, E): the noisy routers' weights in
evaluation (since 2026-11-29 they weight each token in training, `mix_experts_per_token`, not timed here). recipes/bench/stage2_gpu_vitb.yaml has
3 teachers, 5 PASCAL-Context tasks, 4 levels, batch 8 and 1024 tokens of 768 channels at 512 px. Two ways
to write it, each timed for one level (the median of the repeats after warm-up, backward of a weighted sum
of the mixtures included):

- `batched product`: the experts stacked once, (B, T, E) @ (B, E, N*D), what the student runs eager on
  the CPU (`sak.student.router.mix_experts_per_image`), and ran everywhere until 2026-11-27. Its inner
  dimension is E = 4: on an H200 cuBLAS ran it as a batched GEMV at about 50 GB/s, 4.3 ms per level
  forward (benchmarks/results/profile_gpu_h200.txt);
- `multiply-add` (`sak.student.router.mix_by_multiply_adds`, what the student runs on an accelerator or
  compiled): E elementwise multiply-adds per task, which run at memory speed and which torch.compile fuses.

`--per-token`: weights (B, N, E), as the noisy routers give in training; the batched product is then
`mix_experts_per_token`'s CPU branch, (B*N, T, E) @ (B*N, E, D) (results router_mix_<device>_per_token).

Both also compiled (torch.compile of the function, forward and backward), unless --no-compile. The
mixtures are compared with each other (largest absolute difference). Writes
benchmarks/results/router_mix_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

from sak.student.router import mix_by_multiply_adds

from .ways import add_arguments, header, time_ways, ways_table, write_results

RESULTS = Path(__file__).resolve().parent / "results"


def batched_product(experts: list[Tensor], weights: list[Tensor]) -> list[Tensor]:
    """mix_experts_per_image's CPU branch, written out so that it runs as such on any device."""
    b, n, d = experts[0].shape
    stacked = torch.stack(experts, dim=1).view(b, len(experts), n * d)
    w = torch.stack(weights, dim=1).to(stacked.dtype)  # (B, T, E)
    return list(torch.bmm(w, stacked).view(b, len(weights), n, d).unbind(1))


def batched_product_per_token(experts: list[Tensor], weights: list[Tensor]) -> list[Tensor]:
    """mix_experts_per_token's CPU branch, written out so that it runs as such on any device."""
    b, n, d = experts[0].shape
    stacked = torch.stack(experts, dim=2).view(b * n, len(experts), d)
    w = torch.stack(weights, dim=2).to(stacked.dtype).view(b * n, len(weights), -1)  # (B*N, T, E)
    return list(torch.bmm(w, stacked).view(b, n, len(weights), d).unbind(2))


def multiply_add(experts: list[Tensor], weights: list[Tensor]) -> list[Tensor]:
    return [mix_by_multiply_adds(experts, w) for w in weights]


def rows(args, device: torch.device) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.tokens, args.dim)
    experts = [torch.randn(shape, generator=gen).to(device).requires_grad_() for _ in range(args.experts)]
    per = (args.batch, args.tokens, args.experts) if args.per_token else (args.batch, args.experts)
    weights = [torch.randn(per, generator=gen).softmax(-1).to(device).requires_grad_() for _ in range(args.tasks)]
    grads = [torch.randn(shape, generator=gen).to(device) for _ in range(args.tasks)]
    product = batched_product_per_token if args.per_token else batched_product
    ways = {"batched product": product, "multiply-add": multiply_add}
    if args.compile:
        ways |= {f"{name}, compiled": torch.compile(fn) for name, fn in list(ways.items())}
    reference = [m.detach() for m in product(experts, weights)]

    def step(fn) -> None:
        mixed = fn(experts, weights)
        torch.autograd.backward(mixed, grads)
        for t in (*experts, *weights):
            t.grad = None

    return time_ways(ways, step, lambda fn: fn(experts, weights), reference, device, args.repeats, args.warmup)


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [
        f"# The routers' mixing of experts, one level, forward + backward ({result['device']}, torch {result['torch']})",
        "",
        f"Command: `{result['command']}`. {a['tasks']} tasks mix {a['experts']} experts of ({a['batch']}, "
        f"{a['tokens']}, {a['dim']}) float32 with per-{'token' if a.get('per_token') else 'image'} weights; median "
        f"of {a['repeats']} after {a['warmup']} "
        "(see the docstring of benchmarks/router_mix.py). Difference: largest absolute difference of the "
        "mixtures from the batched product's.",
        "",
        *ways_table(result["rows"]),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--per-token", action="store_true", help="weights (B, N, E), the noisy routers' in training")
    add_arguments(parser, RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result = header("router_mix", argv, args, device) | {"rows": rows(args, device)}
    write_results(args.results, f"router_mix_{device.type}" + ("_per_token" if args.per_token else ""), result,
                  markdown(result))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
