"""NYUD-v2 multi-task benchmark in the layout of SAK's Table 6 (semseg mIoU, depth RMSE, normals mErr,
boundary odsF, delta_m), with the published rows beside ours.

    python -m benchmarks.nyud --checkpoint runs/nyud_vitb [--name SAK-B] [--root DATA] ...
    python -m benchmarks.nyud --preds PREDS --name other --root /data/NYUD_MT
    python -m benchmarks.nyud --fixture    # a tiny student on the fixture, about 10 s (busy machine: 1 min)

Writes benchmarks/results/nyud[_fixture].{json,md,png} (or --out PREFIX). See docs/evaluation.md.
"""

from __future__ import annotations

import sys

from .dense_common import main as _main


def main(argv: list[str] | None = None) -> int:
    return _main("nyud", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
