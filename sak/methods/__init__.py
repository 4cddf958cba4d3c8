"""Methods beyond SAK distillation that reuse its teachers.

FreeSel data selection: the samplers and pools are here (`selection.py`); semantic patterns, the
feature pass and the `sak select` command are in `sak.methods.freesel` (import it from there; it is
not imported here so that `python -m sak.methods.freesel` runs it cleanly).
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
