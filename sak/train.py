"""`accelerate launch [launcher flags] -m sak.train RECIPE [key.path=value ...]`

Launcher flags go before `-m`; everything after the module is ours. On a CPU-only machine use
`accelerate launch --multi_gpu --num_processes 2 -m sak.train ...`: `--cpu --num_processes 2` starts
one process in accelerate 1.15.
"""

from __future__ import annotations

import argparse
import sys

from .cli import say_error
from .config import RecipeError, load_recipe

# what a command stopped by Ctrl-C says (one line and status 130, from `sak` and from this module alike)
AGAIN = {
    "train": "; run it again to go on from its last checkpoint (with checkpoint.resume: auto)",
    "cache build": "; run it again to go on where it stopped",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sak.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe", help="YAML recipe file")
    parser.add_argument("overrides", nargs="*", default=[], help="key.path=value overrides, e.g. optim.lr=1e-4")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as exc:  # every process of a launch reads the same recipe: said once
        say_error(f"sak: {exc}", everywhere=False)
        return 2
    from .engine import train

    try:
        train(recipe)
    except KeyboardInterrupt:  # Ctrl-C (each process of a launch gets it): said once, not N tracebacks
        say_error(f"sak train: interrupted{AGAIN['train']}", everywhere=False)
        return 130
    except RecipeError as exc:  # what only the run can find out, e.g. fp16 asked for on a machine without a GPU
        say_error(f"sak: {args.recipe}: {exc}", everywhere=False)
        return 2
    except Exception as exc:  # other bad input (a stale cache, a missing file...): one line, as `sak train`
        from .cli import print_user_error

        if not print_user_error(exc, "train"):
            raise
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
