"""Methods beyond SAK distillation that reuse its teachers.

FreeSel data selection: the samplers and pools are here (`selection.py`); semantic patterns and the
feature pass are in `sak.methods.freesel`, the `sak select` command in `sak.methods.select_command`
(import them from there; they are not imported here so that `python -m sak.methods.freesel` runs cleanly).
"""

from .selection import (
    METHODS,
    ImageFeatures,
    ImageFolderPool,
    SelectionError,
    d2_sampling,
    farthest_point_sampling,
    kcenter_greedy,
    open_pool,
    random_subset,
    resolve_budget,
    select_indices,
    write_manifest,
)

__all__ = [
    "METHODS",
    "ImageFeatures",
    "ImageFolderPool",
    "SelectionError",
    "d2_sampling",
    "farthest_point_sampling",
    "kcenter_greedy",
    "open_pool",
    "random_subset",
    "resolve_budget",
    "select_indices",
    "write_manifest",
]
