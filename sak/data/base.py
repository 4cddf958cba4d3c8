"""The dataset contract shared by every `sak` dataset.

A sample is a dict: "image" is a uint8 (3, H, W) tensor, "id" a string, and each requested task
adds its target under the task's name:

    semseg, parts   int64 (H, W), 255 = ignore
    saliency        float32 (1, H, W) in {0, 1}, 255 = ignore
    edges           float32 (1, H, W) in {0, 1}, 255 = ignore
    normals         float32 (3, H, W) unit vectors, all-zero = ignore
    depth           float32 (1, H, W) metres, 0 = ignore

Random augmentation draws from `self.sample_rng(index)`, a generator seeded by (seed, epoch,
index): the same sample gets the same augmentation in any process, worker or resumed run.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from ..digest import hash_threads, local_processes, sha256_files

IGNORE_INDEX = 255


@dataclass
class DatasetSpec:
    """What the engine passes to every dataset (the recipe's `data` section, minus `options`)."""

    root: str | None = None
    split: str = "train"
    image_size: int = 224
    tasks: tuple[str, ...] = ()
    train: bool = True  # apply training augmentation
    seed: int = 0
    subset: str | None = None  # manifest file: one image id per line


class SakDataset(Dataset):
    """Base class: registered with `@DATASETS.register(name)`, options in a nested `Options`."""

    @dataclass
    class Options:
        pass

    options_type: ClassVar[type] = Options
    supported_tasks: ClassVar[tuple[str, ...]] = ()
    # the classes of its classification targets, {task: count} (background included): a recipe's head for
    # such a task must predict that many channels (checked when the recipe is read); {} = not fixed
    task_classes: ClassVar[dict[str, int]] = {}
    # the revision of the training augmentation's arithmetic, where one changed the pixels it gives: an
    # augmented teacher-feature cache records it, and one built with another revision is refused
    augmentation: ClassVar[str | None] = None
    # data.options that shape only the training augmentation's samples, and those that shape only the
    # un-augmented (evaluation) ones: a teacher-feature cache of the one leaves the other's out of its identity,
    # so that changing them does not refuse it as stale
    train_only_options: ClassVar[tuple[str, ...]] = ()
    eval_only_options: ClassVar[tuple[str, ...]] = ()
    # `sak eval` of a dataset other than PASCAL-Context and NYUD-v2: each task's metric options beyond the class
    # count (which is `task_classes`' or the head's), e.g. {"edges": {"tolerance": 0.011}, "depth": {"max_depth": 10}}
    metric_options: ClassVar[dict[str, dict]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.options_type = cls.__dict__.get("Options", cls.options_type)

    def __init__(self, spec: DatasetSpec, options) -> None:
        unsupported = [t for t in spec.tasks if t not in self.supported_tasks]
        if unsupported:
            raise ValueError(
                f"{type(self).__name__} has no targets for task(s) {unsupported}; it supports {list(self.supported_tasks)}"
            )
        self.spec = spec
        self.options = options
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sample_rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.spec.seed, self.epoch, index])

    def sample_torch_rng(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.sample_rng(index).integers(0, 2**62)))

    def eval_target(self, sample_id: str, task: str, target: torch.Tensor) -> torch.Tensor:
        """The ground truth `sak eval` scores a prediction against, from the evaluation sample's target cropped
        back to the image: the target itself, unless the benchmark's own differs (PASCAL-Context's boundaries)."""
        return target

    def image_at(self, index: int) -> torch.Tensor:
        """`self[index]["image"]`, the one thing a teacher-feature cache build reads; a dataset whose targets
        are costly to load can skip those that do not change the image."""
        return self[index]["image"]

    def image_tasks(self) -> tuple[str, ...]:
        """The requested tasks whose targets change the images (e.g. a crop chosen from the labels): an
        augmented teacher-feature cache records them. By default all of them, as nothing says otherwise."""
        return tuple(self.spec.tasks)

    @classmethod
    def prediction_canvas(cls, image_size: int, options) -> tuple[tuple[int, int], tuple[int, int, int]]:
        """The (H, W) canvas and fill colour in which `sak predict` centres a photograph (one larger than it is
        first resized to fit, aspect kept): the dataset's evaluation canvas, so that predicting an image equals
        evaluating it. By default the square training size, filled with the ImageNet mean colour."""
        from .transforms import IMAGENET_MEAN_UINT8  # (transforms imports this module)

        return (image_size, image_size), IMAGENET_MEAN_UINT8

    def content_digests(self) -> list[tuple[str, str]] | None:
        """(name, sha256) of everything whose content the teachers' inputs are made from, in a fixed order:
        the image files, and with training augmentation also the files that choose the crops. A
        teacher-feature cache records them, so that an image replaced under the same name is noticed. None
        (the default): the samples are generated from the options and seed alone, which the cache records."""
        return None


def read_manifest(path: str) -> list[str]:
    """Image ids, one per line; blank lines and `#` comments ignored."""
    try:
        with open(path, encoding="utf-8") as f:  # as `sak select` writes it, whatever the locale
            ids = [line.split("#", 1)[0].strip() for line in f]
    except OSError as exc:
        raise FileNotFoundError(f"data.subset: cannot read manifest {path!r}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"data.subset: manifest {path!r} is not UTF-8 text ({exc}); sak select writes UTF-8") from exc
    return [i for i in ids if i]


def repeated(ids: list[str]) -> list[str]:
    """The ids listed more than once, sorted."""
    return sorted(i for i, n in collections.Counter(ids).items() if n > 1)


def apply_subset(ids: list[str], manifest: str | None, spec: DatasetSpec | None = None) -> list[str]:
    """Keep the ids listed in `manifest`, in the manifest's order; unknown ids are an error (naming the split
    and root of `spec`)."""
    if manifest is None:
        return ids
    wanted = read_manifest(manifest)
    known = set(ids)
    missing = [i for i in wanted if i not in known]
    if missing:
        split = (
            "the split" if spec is None else f"split {spec.split!r}" + (f" under {spec.root!r}" if spec.root else "")
        )
        raise ValueError(
            f"data.subset {manifest!r}: {len(missing)} of its {len(wanted)} id(s) are not among the {len(ids)} of "
            f"{split}, e.g. {missing[:5]}; was it written for another split or data.root?"
        )
    twice = repeated(wanted)
    if twice:  # (a repeated sample would train twice and weigh twice in evaluation means)
        raise ValueError(f"data.subset {manifest!r} lists {len(twice)} id(s) more than once, e.g. {twice[:5]}")
    return wanted


def subset_rows(ids: list[str], manifest: str | None, spec: DatasetSpec | None = None) -> tuple[list[str], list[int]]:
    """`apply_subset` for datasets that generate samples by position: the kept ids and, for each, its
    position in the full list (the sample it names)."""
    kept = apply_subset(ids, manifest, spec)
    if manifest is None:
        return kept, list(range(len(ids)))
    where = {i: k for k, i in enumerate(ids)}
    return kept, [where[i] for i in kept]


_DIGEST_SHARE: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("digest_share", default=None)


@contextlib.contextmanager
def digest_share(index: int, count: int):
    """Within it, `file_digests` hashes only every `count`-th file from the `index`-th and leaves the others'
    digests "": each of N processes hashes its share, and the engine pools the lists (cache/identity.py)."""
    token = _DIGEST_SHARE.set((index, count))
    try:
        yield
    finally:
        _DIGEST_SHARE.reset(token)


def file_digests(paths) -> list[tuple[str, str]]:
    """(path, sha256 of its bytes) of each file, for `SakDataset.content_digests` (hashed on threads); within
    `digest_share(i, N)` only this process's share, the other digests ""."""
    # absolute: the same file by one name however data.root is written (`imgs` or `/data/imgs`), so that a
    # stale feature cache names the file that changed rather than every file as gone and new
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    share = _DIGEST_SHARE.get()
    if share is None:
        return list(zip(paths, sha256_files(paths), strict=True))
    index, count = share
    digests = [""] * len(paths)
    digests[index::count] = sha256_files(paths[index::count], hash_threads(local_processes(count)))
    return list(zip(paths, digests, strict=True))
