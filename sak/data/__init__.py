"""Datasets (registry `DATASETS`) and the deterministic sampler the engine shards across processes."""

from __future__ import annotations

import importlib

import torch
from torch.utils.data import Sampler

from ..registry import DATASETS
from . import package_images, synthetic  # noqa: F401  (register built-in datasets)
from .base import IGNORE_INDEX, DatasetSpec, SakDataset, apply_subset, read_manifest

# Dataset modules written alongside; each registers itself when imported.
for _module in ("pascal_context", "nyud", "images"):
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"{__name__}.{_module}":
            raise


def build_dataset(name: str, spec: DatasetSpec, options: dict | None = None) -> SakDataset:
    from ..config import build_options

    cls = DATASETS.get(name)
    dataset = cls(spec, build_options(cls, options or {}, where="data"))
    # more samples than the manifest lists (fewer is skip_bad's doing): a plug-in dataset that did not apply it,
    # which trained on its whole split without a word
    if spec.subset is not None and len(dataset) > len(wanted := read_manifest(spec.subset)):
        raise ValueError(
            f"data.subset {spec.subset!r} lists {len(wanted)} id(s), and dataset {name!r} ({cls.__name__}) has "
            f"{len(dataset)} samples of split {spec.split!r}: it did not keep the manifest's samples; a dataset "
            "keeps them with sak.data.base.apply_subset(ids, spec.subset, spec) (or subset_rows)"
        )
    return dataset


class EpochSampler(Sampler[int]):
    """A permutation of the dataset fixed by (seed, epoch), identical in every process.

    Accelerate shards the batches this sampler's order produces, so N processes with batch b see
    exactly the samples one process with batch N * b sees; and a resumed run rebuilds the same
    order from the epoch number alone, without any generator state.
    """

    def __init__(self, length: int, seed: int, shuffle: bool = True) -> None:
        self.length, self.seed, self.shuffle, self.epoch = length, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.length))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=g).tolist())

    def __len__(self) -> int:
        return self.length


__all__ = [
    "IGNORE_INDEX",
    "DatasetSpec",
    "EpochSampler",
    "SakDataset",
    "apply_subset",
    "build_dataset",
    "read_manifest",
]
