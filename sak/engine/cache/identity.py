"""What cached features depend on (teachers, their precision, the data and its content), to refuse a stale cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch

from ...config import Recipe
from ...teachers import Teacher
from .store import FORMAT


def training_dataset(recipe: Recipe, augment: bool):
    """The dataset the training loader reads, built by `build_loader` itself (the recipe's tasks, subset and
    seed): with the training augmentation, PASCAL-Context and NYUD choose their crops from the semseg labels
    when those are loaded, so a dataset built without the recipe's tasks would give other images."""
    from ..build import build_loader

    return build_loader(recipe, recipe.data.split, train=False, augment=augment).dataset.dataset


def ids_digest(dataset) -> str | None:
    """sha256 of the dataset's ordered sample ids: an image added, removed or renamed shifts the indices
    the cache is read by. None for a (plug-in) dataset without an `ids` list: its count is still checked."""
    ids = getattr(dataset, "ids", None)
    if ids is None:
        return None
    return hashlib.sha256(json.dumps([str(i) for i in ids]).encode()).hexdigest()  # (a plug-in's numpy ints too)


def content_digests(dataset, shared: bool = False) -> list[tuple[str, str]] | None:
    """The dataset's (name, sha256) of what its samples are made from (`SakDataset.content_digests`); None for a
    dataset without that method (a plug-in not derived from SakDataset) or made of generated samples.
    `shared`: called by every process of a launch at once (a collective): each hashes every N-th file
    (`file_digests` in `digest_share`) and the lists are pooled, so the data is read once, not N times."""
    method = getattr(dataset, "content_digests", None)
    if method is None:
        return None
    if not (shared and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return method()
    from accelerate.utils import gather_object

    from ...data.base import digest_share

    with digest_share(torch.distributed.get_rank(), torch.distributed.get_world_size()):
        mine = method()
    return pool_digests(gather_object([mine]))


def pool_digests(lists: list[list[tuple[str, str]] | None]) -> list[tuple[str, str]] | None:
    """The processes' `content_digests` under `digest_share` as one list: each name's digest from the process
    that hashed it (a dataset that hashes without `file_digests` gives every digest in every process)."""
    first = lists[0]
    if first is None or any(digests is None for digests in lists):
        return None
    names = [name for name, _ in first]
    if any([name for name, _ in digests] != names for digests in lists):
        raise ValueError("the processes' datasets list other files (content_digests differs between processes)")
    return [(name, next((d[k][1] for d in lists if d[k][1]), "")) for k, name in enumerate(names)]


def _combined(digests: list[tuple[str, str]] | None) -> str | None:
    return None if digests is None else hashlib.sha256(json.dumps([d for _, d in digests]).encode()).hexdigest()


def _json(value):
    """As the manifest stores it (tuples become lists), so that a built identity equals its stored copy."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def data_path(path: str | None) -> str | None:
    """`data.root` / `data.subset` as a cache records them: absolute and normalised, so that `imgs`, `./imgs`,
    `imgs/` and the absolute path from the same directory name the same folder (they were compared as written)."""
    return os.path.abspath(path) if isinstance(path, str) and path else path


def seed_matters(augment: bool | None, content_sha256: str | None, teachers: dict) -> bool:
    """Whether `run.seed` can change cached features: it chooses the augmented views, generates data that has no
    content digest (synthetic), and draws the weights of a teacher built without any (`weights: random`). Else
    the features of the same images through the same weights are the same for any seed, and a seed sweep may
    share one cache."""
    random = any(isinstance(t, dict) and t.get("weights") == "random" for t in teachers.values())
    return bool(augment) or content_sha256 is None or random


def as_now(identity: dict) -> dict:
    """A recorded identity as this sak writes it: `data.options` at their defaults, and those of the other path
    than the cache's, left out (`data_options`), where an older sak wrote them as given; `root` and `subset`
    absolute and normalised (`data_path`), where an older sak wrote them as given; `data.seed` left out where it
    changes no feature (`seed_matters`), where an older sak recorded it always."""
    data = identity.get("data")
    if isinstance(data, dict):
        data = {**data, **{k: data_path(data[k]) for k in ("root", "subset") if k in data}}
        if not seed_matters(identity.get("augment"), data.get("content_sha256"), identity.get("teachers") or {}):
            data.pop("seed", None)
        if "options" in data:
            data["options"] = _json(data_options(data.get("name"), data["options"], identity.get("augment")))
        return {**identity, "data": data}
    return identity


def data_options(name: str, options: dict | None, augment: bool | None = None) -> dict | None:
    """`data.options` as a cache records them: the options whose values differ from the dataset's defaults, so
    that writing out a default (`classes: 5`) or leaving it out names the same cache. The values left are as
    written, which keeps the identities of caches built before 2026-11-28 (they stored the options as written).
    With `augment` given, those that shape only the other path's samples are left out too (the dataset's
    `eval_only_options` for an augmented cache, `train_only_options` for one of un-augmented images): a cache
    was refused as stale for another `eval_size`, which its training samples never see.
    As given for a dataset that is not registered, or whose options do not build."""
    from ...config import build_options
    from ...registry import DATASETS

    if not options:
        return options
    try:
        cls = DATASETS.get(name)
        built = build_options(cls, options, where="data")
    except Exception:  # (the recipe check reports it; an old manifest's options are compared as they are)
        return options
    if augment is not None:
        other = getattr(cls, "eval_only_options" if augment else "train_only_options", ())
        options = {k: v for k, v in options.items() if k not in other}
    if not dataclasses.is_dataclass(built):
        return options
    fields = {f.name: f for f in dataclasses.fields(built)}

    def default(key: str):
        f = fields[key]
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    return {
        k: v
        for k, v in options.items()
        if k not in fields or default(k) is dataclasses.MISSING or _json(getattr(built, k)) != _json(default(k))
    }


def _teacher_identity(teacher: Teacher, config) -> dict:
    """The teacher's metadata (name, source, weights and digest, levels, mean/std, resize, extra...) and all
    of its options, defaults filled in. No option is left out: one that changes no output bit (a pure speed
    switch) is rare, and including it costs at worst a rebuild, where leaving out one that matters trains on
    wrong targets (SAM's `attention` computes the same function with other kernels, not the same bits)."""
    from ...config import build_options

    options = None
    if config is not None:
        built = build_options(type(teacher), config.options, where=config.id)
        options = dataclasses.asdict(built) if dataclasses.is_dataclass(built) else config.options
    meta = teacher.meta.as_dict()
    return {
        **meta,
        "input_size": teacher.input_size,
        "normalization": teacher.spec.normalization,
        "options": options,
        "channels_last": teacher.channels_last,  # other convolution kernels: other rounding
        # a letterboxing teacher's maps are cut to the image's tokens (Teacher.image_region); a cache of the
        # whole canvas, built before, lacks this and is refused
        **({"maps": "image tokens"} if teacher.meta.resize == "longest_pad" else {}),
    }


def teachers_identity(recipe: Recipe, teachers: dict[str, Teacher]) -> dict:
    """Each teacher's identity (`_teacher_identity`) by id, JSON-normalised: the cache's manifest holds it, and
    so does every checkpoint (teachers.json), where a resume compares it: a value the recipe leaves to sak (a
    teacher's default levels, its native size) may differ under another version of sak or of its library."""
    configs = {t.id: t for t in recipe.teachers}
    return _json({tid: _teacher_identity(t, configs.get(tid)) for tid, t in teachers.items()})


def identity(recipe: Recipe, teachers: dict[str, Teacher], views: int, augment: bool, dtype: str,
             dataset=None, digests: list[tuple[str, str]] | None = None) -> dict:  # fmt: skip
    """Everything the cached features depend on, JSON-normalised: the teachers (metadata, options, channels-last),
    their run-time precision (bf16 teachers give other features than float32 ones) and whether they were
    compiled (other kernels), and the data: its sample count, ordered ids and the sha256 of its content (the
    image files; with `augment`, the crop-choosing labels and the names of the tasks that shape the images).
    `dataset`: the training dataset (`training_dataset`), built here when not given; `digests`: its
    `content_digests()`, computed here when not given."""
    from ..build import teacher_dtype  # (imported here, as build_teachers below, to keep this module light)

    if dataset is None:
        dataset = training_dataset(recipe, augment)
    if digests is None:
        digests = content_digests(dataset)
    d = recipe.data
    data = {
        "name": d.name,
        "root": data_path(d.root),
        "split": d.split,
        "image_size": d.image_size,
        "options": data_options(d.name, d.options, augment),
        "subset": data_path(d.subset),
        "seed": recipe.run.seed,  # (left out below where it changes no feature)
        "samples": len(dataset),
        "ids_sha256": ids_digest(dataset),
        "content_sha256": _combined(digests),
    }
    if augment:  # the tasks whose labels change the images (a plug-in dataset without `image_tasks`: all)
        image_tasks = getattr(dataset, "image_tasks", None)
        data["tasks"] = list(image_tasks()) if image_tasks is not None else [t.name for t in recipe.tasks]
        if getattr(dataset, "augmentation", None) is not None:  # (absent before it existed: such caches are refused)
            data["augmentation"] = dataset.augmentation
    ident = {
        "format": FORMAT,
        "dtype": dtype,
        "teacher_precision": str(teacher_dtype(recipe) or torch.float32).removeprefix("torch.")
        + (" (weights cast)" if recipe.precision.teacher_weights == "cast" else ""),
        "compile_teachers": recipe.precision.compile_teachers,
        "views": views,
        "augment": augment,
        "data": data,
        "teachers": teachers_identity(recipe, teachers),
    }
    if not seed_matters(augment, data["content_sha256"], ident["teachers"]):  # (as_now's rule, on the same fields)
        del data["seed"]
    if recipe.precision.compile_teachers and recipe.precision.compile_mode.startswith("max-autotune"):
        # max-autotune may pick other kernels (other roundings); reduce-overhead replays the default mode's
        # kernels. Absent otherwise, so that caches built before compile_mode existed still match
        ident["compile_mode"] = recipe.precision.compile_mode
    return _json(ident)


# identity fields whose recipe key has another name (a teacher's input side is its entry's image_size)
RECIPE_KEYS = {"input_size": "the teacher's image_size"}


def _diff(a: dict, b: dict, prefix: str = "", theirs: str = "recipe gives") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{key}.", theirs)
        elif x != y:
            hint = f" ({RECIPE_KEYS[key]})" if prefix.startswith("teachers.") and key in RECIPE_KEYS else ""
            out.append(f"{prefix}{key}{hint}: cache has {x!r}, {theirs} {y!r}")
    return out
