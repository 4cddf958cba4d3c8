"""`sak select`: the command around FreeSel's feature pass (freesel.py) and the samplers (selection.py).

`add_select_command(subparsers)` adds `select` to any argparse parser; `sak.cli` uses it, and
`python -m sak.methods.freesel` runs it through `sak.cli`.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ..config.yaml_read import read_pairs
from ..files import check_not_input
from .freesel import PatternOptions, attention_unavailable, build_teacher, extract_features, vit_of
from .selection import (
    METHODS,
    METRICS,
    SelectionError,
    check_ids,
    check_writable,
    open_pool,
    resolve_budget,
    select_indices,
    write_manifest,
)

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_select_command(subparsers) -> argparse.ArgumentParser:
    """Add `select` to an argparse sub-parser set (`sak select ...`); returns the new parser."""
    p = subparsers.add_parser(
        "select",
        help="pick the images worth labelling (FreeSel) and write a manifest for data.subset",
        description="FreeSel data selection: one pass of a frozen teacher, no training (docs/selection.md).",
    )
    p.add_argument("--pool", required=True, help="a folder of images (recursive) or a recipe YAML (its data section)")
    p.add_argument("--budget", required=True, help="images to select: a count (200) or a share of the pool (10%%)")
    p.add_argument("--teacher", help="registered teacher name (sak teachers list); not needed for --method random")
    p.add_argument(
        "--weights",
        default=None,
        help="the teacher's weights (hub tag or local file); without it, the teacher's default: random weights "
        "for dinov2 / clip / sam / timm (tests; a warning says so), the package's file for dinov2_imgfocus",
    )
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a teacher option (YAML value)")
    p.add_argument(
        "--image-size", type=int, default=None, help="teacher input side; default: the teacher's native size"
    )
    p.add_argument(
        "--block",
        type=int,
        default=None,
        help="ViT block of the patch features (negative = from the end; default -2, the penultimate); "
        "for other teachers, the level to return (default: their deepest)",
    )
    p.add_argument("--method", choices=METHODS, default="freesel")
    p.add_argument("--k", type=int, default=5, help="semantic patterns (k-means centres) per image")
    p.add_argument("--keep", type=float, default=0.5, help="share of the CLS-attention mass the kept patches carry")
    p.add_argument(
        "--filter",
        choices=["auto", "attention", "norm"],
        default="auto",
        help="patch filter: the last block's CLS attention or the features' L2 norms (auto: attention if possible)",
    )
    p.add_argument("--distance", choices=METRICS, default="cosine", help="distance between patterns / features")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="teacher autocast dtype")
    p.add_argument(
        "--set",
        dest="sets",  # (not "overrides": the CLI gives stray key=value arguments to a positional of that name)
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override (e.g. data.split=val)",
    )
    p.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="MODULE",
        help="a plug-in module to import first (a teacher or dataset of your own), as a recipe's imports: (repeatable)",
    )  # fmt: skip
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--out", required=True, help="manifest to write: one image id per line")
    p.set_defaults(func=run_select)
    return p


def pool_inputs(pool: str, overrides) -> tuple[list, list]:
    """(files, folders) a manifest must not be written onto or into: a recipe pool's file, data.subset and
    data.root (its split files among them), or a folder pool."""
    from pathlib import Path

    if Path(pool).is_dir():
        return [], [pool]
    from ..config import load_recipe

    data = load_recipe(pool, list(overrides)).data  # (open_pool has read it: valid)
    return [pool, data.subset], [data.root]


def select(args: argparse.Namespace) -> int:
    """`sak select`: validate everything cheap first, run the feature pass, sample, write the manifest."""
    from accelerate import PartialState
    from accelerate.utils import set_seed

    from ..config import RecipeError, import_plugins

    try:
        import_plugins(args.imports, where="--import")
    except RecipeError as exc:
        raise SelectionError(str(exc)) from None
    pool, ids = open_pool(args.pool, args.sets)
    budget = resolve_budget(args.budget, len(pool))
    check_writable(args.out)  # before the feature pass, not after it
    check_not_input(args.out, *pool_inputs(args.pool, args.sets))
    if not 0 <= args.seed < 2**32:  # what numpy's and Accelerate's seeding take (their errors name no flag)
        raise SelectionError(f"--seed must be from 0 to 2**32 - 1, got {args.seed}")
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--num-workers", args.num_workers, 0)):
        if value < least:  # (the DataLoader's own errors name no flag, and come after the teacher is built)
            raise SelectionError(f"{flag} must be at least {least}, got {value}")
    if args.image_size is not None and args.image_size < 1:
        raise SelectionError(f"--image-size must be a positive side in pixels, got {args.image_size}")
    if ids is not None:
        check_ids(ids)
    options = PatternOptions(block=args.block, keep=args.keep, k=args.k, filter=args.filter, seed=args.seed)
    if args.method != "random" and not args.teacher:
        raise SelectionError(f"--method {args.method} needs --teacher NAME (see `sak teachers list`)")
    from ..registry import TEACHERS

    if args.teacher and args.teacher not in TEACHERS:
        raise SelectionError(f"--teacher: unknown teacher {args.teacher!r}; known: {', '.join(TEACHERS.names())}. "
                             "A teacher of a plug-in module: --import MODULE")  # fmt: skip
    start, features, used = time.perf_counter(), None, "none"
    if args.method != "random":
        set_seed(args.seed)  # a teacher with random weights (tests) is then the same in every run and process
        teacher = build_teacher(
            args.teacher, args.weights, read_pairs(args.option, "--option", SelectionError), args.image_size, args.block
        )
        main_process = PartialState(cpu=not torch.cuda.is_available()).is_main_process  # (warnings: once)
        if teacher.meta.weights == "random" and main_process:
            print(  # the features of random weights select no better than chance: worth saying, not refusing (tests)
                f"sak select: warning: --teacher {args.teacher} has no --weights: it runs with random weights, "
                "whose features are for tests; give a hub tag or a local file for a real selection",
                file=sys.stderr,
            )
        why_not = attention_unavailable(vit_of(teacher)) if vit_of(teacher) is not None else None
        patterns = args.method in ("freesel", "farthest")  # (k-center takes the global features: no filter)
        if patterns and args.filter == "auto" and why_not and main_process:
            print(  # (the norms of a ViT's patches after its final LayerNorm are nearly equal: docs/selection.md)
                f"sak select: warning: --teacher {args.teacher} is a ViT whose CLS attention cannot be read "
                f"({why_not}): its patches are filtered by their feature norms, which its final LayerNorm makes "
                "nearly equal, so about half are kept whatever they show",
                file=sys.stderr,
            )
        dtype = DTYPES[args.dtype]
        features, used = extract_features(
            teacher, pool, options, args.batch_size, args.num_workers, dtype, args.progress
        )
        ids = [f.id for f in features]
    elif ids is None:
        ids = [pool[i]["id"] for i in range(len(pool))]
    state = PartialState(cpu=not torch.cuda.is_available())
    extracted = time.perf_counter()
    if not state.is_main_process:  # the features are gathered; the other processes are done. They do not wait
        return 0  # at a barrier for the sampling, which past a large pool outlasts NCCL's 10-minute timeout
    chosen = select_indices(args.method, budget, len(pool), features, args.seed, args.distance, state.device)
    sampled = time.perf_counter()
    overrides = "".join(f" --set {o}" for o in args.sets)  # they choose the pool's split and images
    header = [
        f"sak select --pool {args.pool}{overrides} --method {args.method} --budget {args.budget} "
        f"({budget} of {len(pool)})",
        f"teacher={args.teacher} weights={args.weights} options={args.option} image_size={args.image_size} "
        f"dtype={args.dtype} filter={used} block={'default' if args.block is None else args.block} "
        f"k={args.k} keep={args.keep} distance={args.distance} seed={args.seed}",
        *([pool.source] if getattr(pool, "source", "") else []),  # the recipe's data, as resolved: its file may change
    ]
    write_manifest(args.out, [ids[i] for i in chosen], header)
    print(
        f"sak select: {budget} of {len(pool)} images ({args.method}, filter {used}) -> {args.out} "
        f"on {state.num_processes} process(es) [features {extracted - start:.1f} s, "
        f"sampling {sampled - extracted:.2f} s]"
    )
    return 0


def run_select(args: argparse.Namespace) -> int:
    try:
        return select(args)
    except SelectionError as exc:
        from ..cli import say_error

        say_error(f"sak select: {worker_message(exc)}")
        return 2


def worker_message(exc: Exception) -> str:
    """The message of an error raised in a DataLoader worker, which PyTorch re-raises with the worker's whole
    traceback in it ("Caught X in DataLoader worker process 0. Original Traceback ..."): its last line, the
    original `module.Type: message`, without the type."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last
