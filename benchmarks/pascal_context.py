"""PASCAL-Context multi-task benchmark in the layout of SAK's Table 5 (semseg mIoU, parts mIoU, saliency
maxF, normals mErr, boundary odsF, delta_m), with the published rows beside ours.

    python -m benchmarks.pascal_context --checkpoint runs/pascal_vitb [--name SAK-B] [--root DATA] ...
    python -m benchmarks.pascal_context --preds PREDS --name other --root /data/PASCAL_MT
    python -m benchmarks.pascal_context --fixture    # a tiny student on the fixture, about 10 s (busy machine: 1 min)

Writes benchmarks/results/pascal_context[_fixture].{json,md,png} (or --out PREFIX). See docs/evaluation.md.
"""

from __future__ import annotations

import sys

from .dense_common import main as _main


def main(argv: list[str] | None = None) -> int:
    return _main("pascal_context", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
