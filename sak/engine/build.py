"""Build a run's parts from a validated recipe: teachers, student, tasks, datasets, optimiser."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.utils.data import DataLoader, default_collate

from ..config import PrecisionConfig, Recipe
from ..data import DatasetSpec, EpochSampler, build_dataset
from ..data.images import DataError
from ..losses.normalize import TargetNormalizers
from ..registry import LOSSES, STUDENTS
from ..student import TeacherAgnosticStem, TeacherSlot
from ..student.adapters import TeacherSpecificAdapterPath, tracks_running_stats
from ..tasks import Task, create_task
from ..teachers import Teacher, TeacherSpec, create_teacher
from .cache import CachedRows

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None, "no": None}


def precision_dtype(p: PrecisionConfig) -> torch.dtype | None:
    """The teachers' run-time dtype (`precision.teachers`, or `precision.mixed` when it is auto); None = float32."""
    return DTYPES[p.teacher_precision]


def teacher_dtype(recipe: Recipe) -> torch.dtype | None:
    return precision_dtype(recipe.precision)


def prepare_teacher(teacher: Teacher, p: PrecisionConfig) -> Teacher:
    """Apply the recipe's teacher-precision settings: weights cast once, channels-last, torch.compile."""
    if p.teacher_weights == "cast":  # validate() made sure the precision is bf16 / fp16
        teacher.cast_weights(precision_dtype(p))
    convolutional = sum(isinstance(m, torch.nn.Conv2d) for m in teacher.modules()) > 1  # not just a patch embed
    if p.channels_last and convolutional:
        teacher.to(memory_format=torch.channels_last)
        teacher.channels_last = True
    if p.compile_teachers:
        teacher.compile(**p.compile_options)
    return teacher


def build_teachers(recipe: Recipe, device: torch.device) -> dict[str, Teacher]:
    teachers = {}
    for t in recipe.teachers:
        spec_fields = {f.name: getattr(t, f.name) for f in dataclasses.fields(TeacherSpec)}  # all of them
        teacher = create_teacher(t.name, spec=TeacherSpec(**spec_fields), **t.options).to(device)
        teachers[t.id] = prepare_teacher(teacher, recipe.precision)
    return teachers


def build_tasks(recipe: Recipe) -> dict[str, Task]:
    return {t.name: create_task(t.name, channels=t.channels, weight=t.weight) for t in recipe.tasks}


def stem_input_size(student, image_size: int) -> int | tuple[int, int]:
    """The size the stem is built for: `student.input_size` (H, W), else data.image_size (a square)."""
    return tuple(student.input_size) if student.input_size else image_size


def build_student(recipe: Recipe, teachers: dict[str, Teacher], tasks: dict[str, Task]) -> torch.nn.Module:
    s = recipe.student
    stem = TeacherAgnosticStem(s.model, stem_input_size(s, recipe.data.image_size), s.pretrained, s.normalization,
                               **s.model_kwargs)  # fmt: skip
    size, patch = recipe.data.image_size, stem.patch_size
    for side in s.input_size or ():
        if side % patch:
            raise ValueError(f"student.input_size {s.input_size}: {side} is not a multiple of the student's patch size "
                             f"{patch} ({s.model})")  # fmt: skip
    if size % patch:
        below, above = size - size % patch, size - size % patch + patch
        raise ValueError(
            f"data.image_size {size} is not a multiple of the student's patch size {patch} ({s.model}): its patch "
            f"embedding would drop the last {size % patch} px of every crop; use {f'{below} or {above}' if below else above}"
        )
    adapters = {t.id: t.adapter for t in recipe.teachers}
    slots = [TeacherSlot(tid, teacher.level_dims, adapters[tid]) for tid, teacher in teachers.items()]
    channels = {name: task.channels for name, task in tasks.items()}
    student = STUDENTS.get(s.architecture).from_config(stem, slots, channels, s)
    for module in student.modules():  # the stem's blocks and the adapter paths (recomputed in backward)
        if isinstance(module, (TeacherAgnosticStem, TeacherSpecificAdapterPath)):
            module.grad_checkpointing = s.grad_checkpointing
    if s.lora:
        student.stem.add_lora(s.lora)
        if tasks:  # the official recipe: stage 1 trains only LoRA in the stem, stage 2 everything plus LoRA
            student.stem.requires_grad_(True)
    apply_freeze(student, s.freeze)
    return student


def prepare_student(student: torch.nn.Module, p: PrecisionConfig) -> torch.nn.Module:
    """Apply `precision.compile_student` (in `precision.compile_mode`): torch.compile in place
    (nn.Module.compile), so that the parameter names, checkpoints and exports are those of the eager module."""
    if p.compile_student:
        student.compile(**p.compile_options)
    return student


def sync_batch_norm(student: torch.nn.Module, processes: int, device: torch.device) -> str | None:
    """`student.sync_bn`: the student's batch norm layers (the task heads') as torch's SyncBatchNorm, which
    normalises over every process's share of the batch (the same parameters and buffers, so checkpoints and
    exports are unchanged). With one process there is nothing to synchronise; on the CPU torch cannot (its
    SyncBatchNorm refuses CPU tensors), and each process keeps its own statistics: said in the returned note."""
    if processes < 2 or not tracks_running_stats(student):
        return None
    if device.type == "cpu":
        return (f"[sak] student.sync_bn: not on the CPU (torch synchronises batch norm on GPUs only): each of the "
                f"{processes} processes normalises the heads over its own share of the batch")  # fmt: skip
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)  # (replaces the layers in place, keeping their tensors)
    return f"[sak] student.sync_bn: the heads' batch norm normalises over the batch of all {processes} processes"


def apply_freeze(student: torch.nn.Module, freeze: str) -> None:
    """`stem`: the TAS stays fixed, but for its LoRA weights where `student.lora` adds them (the reason to add
    them); `all_but_routers`: only the MoR routers (and new heads) learn."""
    if freeze == "stem":
        student.stem.requires_grad_(False)
        for name, p in student.stem.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
    elif freeze == "all_but_routers":
        for name, p in student.named_parameters():
            p.requires_grad_(name.startswith(("routers.", "heads.")))


def build_distill_loss(recipe: Recipe, compiled: bool | None = None) -> torch.nn.Module:
    """The recipe's distillation loss, torch.compile'd in place when `compiled` (default:
    `precision.compile_losses`). Dynamo's default shapes: the first teacher's maps get a static graph, the
    next shapes one with dynamic sizes that the other teachers and evaluation's batches reuse (3 graphs in
    all for the two teachers of tests/tiny.yaml, training and evaluation), where static shapes would compile
    once per teacher and batch size and could pass dynamo's recompile limit (8) and fall back to eager."""
    loss = LOSSES.get(recipe.loss.distill)(**recipe.loss.options)
    if recipe.precision.compile_losses if compiled is None else compiled:
        loss.compile(**recipe.precision.compile_options)
    return loss


def build_target_normalizers(recipe: Recipe, teachers: dict[str, Teacher]) -> TargetNormalizers | None:
    if recipe.loss.normalize == "none":
        return None
    loss = recipe.loss
    return TargetNormalizers(
        {tid: t.level_dims for tid, t in teachers.items()}, loss.normalize, loss.normalize_every, loss.normalize_until
    )


class IndexedDataset(torch.utils.data.Dataset):
    """Adds each sample's position ("index"). With `views` set, the augmentation of epoch e is that of
    epoch e % views (the views a teacher-feature cache holds); with `cache` set, each batch (`collate`)
    also carries its cached teacher maps ("cached"): with `pinned` (a loader that pins its batches, on a GPU
    machine) as a `CachedRows` that the loader's pin-memory step reads straight into page-locked memory,
    otherwise read in the collate."""

    def __init__(self, dataset, views: int | None = None, tasks: dict[str, Task] | None = None) -> None:
        self.dataset, self.views = dataset, views
        self.tasks = tasks or {}  # each sample's targets checked against their heads (Task.target_problem)
        self.cache = None
        self.pinned = False
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def sample_name(self, index: int) -> str:
        """`<Dataset> sample '<id>'` (its position where the dataset keeps no `ids`), for errors."""
        ids = getattr(self.dataset, "ids", None)
        known = isinstance(ids, (list, tuple)) and 0 <= index < len(ids)
        return f"{type(self.dataset).__name__} sample {ids[index] if known else index!r}"

    def __getitem__(self, index: int) -> dict:
        try:
            sample = self.dataset[index]
        except DataError:
            raise  # (names its file)
        except (ValueError, KeyError) as exc:  # a transform's refusal (a label's size, a canvas), said of which sample
            said = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise DataError(f"{self.sample_name(index)}: {type(exc).__name__}: {said}") from exc
        image = sample.get("image") if isinstance(sample, dict) else None
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
            what = f"a {type(image).__name__} of shape {tuple(image.shape)}" if hasattr(image, "shape") else repr(image)
            raise DataError(  # (it failed deep inside the first teacher, in its own words)
                f"{self.sample_name(index)}: its 'image' is {what}; samples follow sak/data/base.py: a dict whose "
                "'image' is a (3, H, W) tensor, uint8 (channels first: numpy's (H, W, 3) transposed)"
            )
        asked = getattr(getattr(self.dataset, "spec", None), "tasks", ())
        missing = [name for name in asked if name not in sample]
        if missing:  # (a KeyError in the loss, before)
            raise DataError(f"{self.sample_name(index)} has no target for task(s) {missing}, which the run asks for")
        for name, task in self.tasks.items():
            problem = task.target_problem(sample[name]) if name in sample else None
            if problem is not None:
                raise DataError(f"{self.sample_name(index)}: {name}: {problem}")
        return {**sample, "index": index}

    def collate(self, samples: list[dict]) -> dict:
        """The loader's collate_fn: `default_collate`, and with a cache the batch's maps (see the class)."""
        batch = default_collate(samples)
        if self.cache is not None:
            rows = CachedRows(self.cache, batch["index"].tolist(), self.epoch)
            batch["cached"] = rows if self.pinned else rows.read()
        return batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch % self.views if self.views else epoch)


def build_loader(
    recipe: Recipe,
    split: str,
    train: bool,
    batch_size: int | None = None,
    augment: bool | None = None,
    tasks: tuple[str, ...] | None = None,
) -> DataLoader:
    """A DataLoader over `split`; training order comes from `EpochSampler` (same in every process).
    `augment` (default: `train`) chooses the dataset's training augmentation; `tasks` the targets it loads
    (default: the recipe's tasks)."""
    d = recipe.data
    spec = DatasetSpec(
        root=d.root,
        split=split,
        image_size=d.image_size,
        tasks=tuple(t.name for t in recipe.tasks) if tasks is None else tasks,
        train=train if augment is None else augment,
        seed=recipe.run.seed,
        subset=d.subset if split == d.split else None,
    )
    dataset = IndexedDataset(build_dataset(d.name, spec, d.options), tasks=build_tasks(recipe))
    dataset.pinned = torch.cuda.is_available()  # page-locked batches: asynchronous copies to the GPU
    batch = batch_size or d.batch_size
    if train and len(dataset) < batch:
        raise ValueError(f"data: split {split!r} has {len(dataset)} samples, fewer than data.batch_size={batch}")
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=EpochSampler(len(dataset), recipe.run.seed, shuffle=train),
        num_workers=d.num_workers,
        collate_fn=dataset.collate,
        pin_memory=dataset.pinned,
        drop_last=train,
        persistent_workers=False,  # workers are rebuilt each epoch so they see the dataset's new epoch
        # Its own generator: creating an iterator (every epoch, and on resume) would otherwise draw from the
        # global RNG and shift the dropout / drop-path masks of a resumed run.
        generator=torch.Generator().manual_seed(recipe.run.seed),
    )


def build_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW; norms, biases, scales and position/CLS tokens get no weight decay unless `optim.decay` is `all`.
    Two parameter groups either way, so that a resume may change `optim.decay` (the recipe's settings win)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim <= 1 or name.endswith((".pos_embed", ".cls_token", ".reg_token"))
        (no_decay if flat else decay).append(p)
    o = recipe.optim
    flat_decay = o.weight_decay if o.decay == "all" else 0.0
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": flat_decay}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=o.fused or None)


def total_steps(recipe: Recipe, batches_per_epoch: int) -> int:
    """Optimiser steps in the run (schedule.max_steps, or epochs x steps per epoch)."""
    s = recipe.schedule
    if s.max_steps is not None:
        return s.max_steps
    return s.epochs * steps_per_epoch(recipe, batches_per_epoch)


def steps_per_epoch(recipe: Recipe, batches_per_epoch: int) -> int:
    """Optimiser steps an epoch takes: Accelerate steps at the end of the loader too, so an epoch whose
    batches do not divide by optim.grad_accum ends with a step over fewer micro-batches (ceil, not floor)."""
    return max(1, math.ceil(batches_per_epoch / recipe.optim.grad_accum))


def warmup_steps(recipe: Recipe, batches_per_epoch: int) -> int:
    """schedule.warmup_steps, or warmup_epochs x steps per epoch rounded down; by a millionth of a step up first,
    so that a product a float lands just below a whole number (2.3 x 100 = 229.99999999999997) is that number."""
    s = recipe.schedule
    return s.warmup_steps or int(s.warmup_epochs * steps_per_epoch(recipe, batches_per_epoch) + 1e-6)
