"""`sak cache`: build a teacher-feature cache for a recipe's training split, or say what a cache holds."""

from __future__ import annotations

import sys
from pathlib import Path

from ...cli import say_error
from ...config import load_recipe


def add_cache_command(sub) -> None:
    p = sub.add_parser("cache", help="precompute the teachers' outputs for a recipe's training split (build), "
                                     "or say what a cache holds (info DIR [--verify])")  # fmt: skip
    p.add_argument("action", choices=["build", "info"])
    p.add_argument("recipe", metavar="RECIPE_OR_DIR", help="build: the recipe; info: the cache directory")
    p.add_argument("overrides", nargs="*", default=[])
    p.add_argument("--out", help="build: the cache directory to write (required)")
    p.add_argument("--verify", action="store_true",
                   help="check every shard's sha256 (info; build: once the cache is complete)")  # fmt: skip
    # The build-only options default to None, so that `cache info` can refuse them; cache_main fills in the defaults.
    p.add_argument("--views", type=int,
                   help="build: augmented views per sample, with --augment (training epoch e uses e %% views; default 1)")  # fmt: skip
    p.add_argument("--augment", action="store_true", help="build: store the training augmentation's views")
    p.add_argument("--dtype", choices=["fp16", "int8"], help="build: fp16 (default) or int8 with per-channel scales")
    p.add_argument("--shard-size", type=int, help="build: samples per shard file (default 256)")
    p.add_argument("--batch-size", type=int, help="build: images per teacher forward pass (default 16)")
    p.set_defaults(func=cache_main)


def cache_main(args) -> int:
    """`sak cache build RECIPE --out DIR` / `sak cache info DIR`."""
    from . import CacheError, FeatureCache, build_cache, check_build_options, describe

    if args.action == "info":  # `recipe` is the cache directory here
        build_only = {"--out": args.out, "--views": args.views, "--augment": args.augment or None,
                      "--dtype": args.dtype, "--shard-size": args.shard_size, "--batch-size": args.batch_size}  # fmt: skip
        extra = [*args.overrides, *(flag for flag, value in build_only.items() if value is not None)]
        if extra:  # (`cache info a b --verify` checked `a` alone and said ok; `--dtype int8` read as if it mattered)
            say_error(f"sak cache info: one cache directory, and no build options; got also {extra}", everywhere=False)
            return 2
        try:
            print("\n".join(describe(Path(args.recipe))))
            if args.verify:
                cache = FeatureCache(Path(args.recipe))
                cache.verify_all()
                print(f"  every shard matches its sha256 ({len(cache.manifest['shards'])} checked)")
        except CacheError as exc:
            print(f"sak: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.out is None:
        say_error("sak cache build: --out DIR is required (where the cache is written)", everywhere=False)
        return 2
    defaults = {"views": 1, "dtype": "fp16", "shard_size": 256, "batch_size": 16}  # (None above: info refuses them)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        check_build_options(args.views, args.augment, args.dtype, args.shard_size, args.batch_size)
    except ValueError as exc:
        say_error(f"sak cache build: {exc}", everywhere=False)
        return 2
    recipe = load_recipe(args.recipe, args.overrides)
    try:
        out = build_cache(
            recipe, Path(args.out), args.views, args.augment, args.dtype, args.shard_size, args.batch_size
        )
    except CacheError as exc:  # another cache in --out, a damaged manifest or shard: the message says what to do
        say_error(f"sak: {exc}")
        return 2
    from accelerate import PartialState

    if PartialState().is_main_process:  # once, not by each of N processes
        if args.verify:  # every shard read back, as `cache info --verify` does
            try:
                cache = FeatureCache(out)
                cache.verify_all()
            except CacheError as exc:
                print(f"sak: {exc}", file=sys.stderr)
                return 2
            print(f"every shard matches its sha256 ({len(cache.manifest['shards'])} checked)")
        print(f"teacher-feature cache ready: {out}/ (use it with cache.path={out})")
    return 0
