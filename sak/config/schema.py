"""The recipe schema: one typed dataclass per section, defaults filled in."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from ..teachers.base import TeacherSpec


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the key path."""


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"  # the run directory is output_dir/name
    seed: int = 0
    stage: Literal["distill", "multitask"] = "distill"  # stage 1 (distillation only) or stage 2
    stop_at: int | None = None  # stop (with a checkpoint) after this step, e.g. to fit a time-limited job
    tune_malloc: bool = True  # CPU training: keep freed memory in the process (glibc mallopt; sak/engine/malloc.py)


@dataclass
class TeacherConfig(TeacherSpec):
    name: str = ""  # registry name, e.g. timm, dinov2, clip, sam
    key: str | None = None  # name of this teacher's outputs and adapter path; default = name
    adapter: str = "bottleneck"  # TSAP adapter type (registry of adapters)
    options: dict = field(default_factory=dict)  # the teacher class's own Options

    @property
    def id(self) -> str:
        return self.key or self.name


@dataclass
class StudentConfig:
    architecture: str = "sak"  # registry of student architectures: sak, many_to_one (the baselines)
    model: str = "vit_small_patch16_224"  # timm ViT name for the teacher-agnostic stem
    pretrained: str | None = None  # timm pretrained tag ("augreg_in21k_ft_in1k"), a local file, or None
    # the mean / std of the student's input: the pretrained weights' own (timm's pretrained_cfg), or ImageNet's,
    # which the official SAK code feeds the student and every teacher
    normalization: Literal["pretrained", "imagenet"] = "pretrained"
    model_kwargs: dict = field(default_factory=dict)
    levels: list[int] | None = None  # stem blocks that feed the 4 output levels; None = evenly spaced
    down_ratio: int = 4  # TSAP adapter bottleneck ratio r
    aligner: Literal["auto", "always"] = "auto"  # auto: only when the widths differ
    router: str = "noisy"  # MoR router type (registry of routers): noisy, none, pixel
    freeze: Literal["none", "stem", "all_but_routers"] = "none"  # what stays fixed (the official code's options)
    # recompute each stem block's and adapter's activations in backward instead of keeping them from the forward:
    # less memory, one more forward of the blocks and adapters per step
    grad_checkpointing: bool = False
    # the task heads' batch norm over the whole batch of all processes (torch's SyncBatchNorm, as the official
    # code trains stage 2), not each process's share; on GPUs only (torch synchronises no CPU batch norm)
    sync_bn: bool = False
    # [H, W] the stem is built for, its position-embedding grid (NYUD's 448 x 576: 28 x 36 at patch 16, as the
    # official student learns it); None: data.image_size square. Other inputs are resampled to it (dynamic_img_size)
    input_size: list[int] | None = None
    lora: dict = field(
        default_factory=dict
    )  # peft LoraConfig keywords for the stem, e.g. {r: 8, target_modules: [qkv]}


@dataclass
class TaskConfig:
    name: str = ""
    weight: float | None = None  # None = the task's published default weight
    channels: int | None = None  # None = the task's default (e.g. 21 classes for PASCAL semseg)


@dataclass
class DataConfig:
    name: str = "synthetic"  # dataset registry name
    root: str | None = None
    split: str = "train"
    options: dict = field(default_factory=dict)  # the dataset's own keyword arguments
    image_size: int = 224  # training crop side
    batch_size: int = 8  # per process
    num_workers: int = 0
    subset: str | None = None  # a manifest file of image ids
    # copy batch k+1 to the GPU on a side stream while step k runs (sak/engine/prefetch.py); for caches,
    # whose batches are large. Needs optim.grad_accum 1. No effect on the CPU beyond reading one batch ahead.
    # auto: on when training reads a cache on a CUDA device with optim.grad_accum 1 (`prefetch_enabled`)
    prefetch_to_device: bool | Literal["auto"] = "auto"


@dataclass
class CacheConfig:
    path: str | None = None  # a teacher-feature cache (`sak cache build`); training reads it instead of the teachers


@dataclass
class EvalConfig:
    every: int = 0  # optimiser steps between evaluations; 0 = only at the end
    at_start: bool = False  # also evaluate the untrained student (step 0), e.g. for before/after tables
    split: str = "val"
    batches: int = 0  # the first N batches of the split, whatever the number of processes; 0 = all of it
    batch_size: int = 8  # per process
    # host memory (GiB) for the teachers' outputs on the held-out images, kept from the first evaluation for the
    # later ones (fixed crops, frozen teachers: the same outputs); batches past it run the teachers; 0 = every time
    keep_targets_gib: float = 1.0


@dataclass
class LossConfig:
    distill: str = "sak"  # loss registry name
    options: dict = field(default_factory=dict)  # the distillation loss's keyword arguments
    normalize: Literal["none", "standardize", "phi_s"] = "none"  # teacher targets before the loss (SAK: none)
    # steps between rebuilding the normalising map from the statistics; auto: 1 (standardize), 100 (phi_s, RADIO)
    normalize_every: int | Literal["auto"] = "auto"
    # the step from which statistics and map stay fixed; auto: never (standardize), 30 x normalize_every (phi_s)
    normalize_until: int | Literal["auto", "never"] = "auto"
    alpha: float = 1.0  # weight of the distillation loss in stage 2


@dataclass
class OptimConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    # which parameters weight_decay applies to: `matrices` (norms, biases, scales and position / class tokens are
    # left alone, timm's and most ViT recipes' rule) or `all` (every parameter, as the official SAK code)
    decay: Literal["matrices", "all"] = "matrices"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float | None = None  # max global grad norm; None = no clipping
    grad_accum: int = 1
    fused: bool = True  # AdamW's fused kernel (all parameters in one pass); false = PyTorch's default loop
    max_nonfinite: int = 5  # stop after this many consecutive steps with a non-finite loss or gradient norm


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "poly", "constant"] = "cosine"
    max_steps: int | None = None  # length in optimiser steps, or
    epochs: int | None = None  # length in epochs (exactly one of the two)
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    min_lr: float = 0.0  # cosine floor
    power: float = 0.9  # poly exponent


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that replay CUDA graphs


@dataclass
class PrecisionConfig:
    mixed: Literal["no", "bf16", "fp16"] = "no"  # student autocast through Accelerate
    teachers: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto = same as `mixed`
    # how teachers run in a low `teachers` precision: float32 weights under autocast, or weights cast to it
    # once, so that the whole forward (LayerNorm and softmax inputs, the residual stream) runs in it
    teacher_weights: Literal["autocast", "cast"] = "autocast"
    channels_last: bool = True  # convolutional teachers run in channels-last memory format
    compile_teachers: bool = False  # torch.compile each teacher's forward (first steps pay the compile time)
    # torch.compile the student in place (parameter names, checkpoints and exports unchanged); the first
    # training step and the first evaluation each pay a compile
    compile_student: bool = False
    # torch.compile the distillation loss module in place (a few compiles: the teachers' maps have their own
    # shapes): on a GPU its many small eager operations are bound by launching them; the task losses stay eager
    compile_losses: bool = False
    # torch.compile's mode for what the three keys above compile. reduce-overhead: each compiled graph is
    # replayed as a CUDA graph, one launch for all its kernels (on CUDA devices; elsewhere it compiles as
    # default); the trainer marks where each step begins. max-autotune: also tries kernel configurations
    # (long compiles), with CUDA graphs; max-autotune-no-cudagraphs: without them
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"

    @property
    def teacher_precision(self) -> str:
        """What the teachers run in: `teachers`, or `mixed` when it is auto ("no", "fp32", "bf16", "fp16")."""
        return self.mixed if self.teachers == "auto" else self.teachers

    @property
    def compile_options(self) -> dict[str, str]:
        """torch.compile's keyword arguments for `compile_mode` (none for the default)."""
        return {} if self.compile_mode == "default" else {"mode": self.compile_mode}

    @property
    def cuda_graphs(self) -> bool:
        """Whether something is compiled in a mode that replays CUDA graphs (on a CUDA device)."""
        compiled = self.compile_student or self.compile_teachers or self.compile_losses
        return compiled and self.compile_mode in CUDA_GRAPH_MODES


@dataclass
class CheckpointConfig:
    every: int = 0  # optimiser steps between checkpoints; 0 = only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto (latest in the run directory), never, or a checkpoint directory
    init_from: str | None = None  # a run, checkpoint or its model.safetensors whose student starts stage 2


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "sak"


@dataclass
class LoggingConfig:
    every: int = 10  # optimiser steps between log lines
    progress: bool = True
    tensorboard: bool = False
    sample_ids: bool = False  # write the ids each process trained on, per step, to samples/rank<N>.jsonl
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Recipe:
    imports: list[str] = field(default_factory=list)
    run: RunConfig = field(default_factory=RunConfig)
    teachers: list[TeacherConfig] = field(default_factory=list)
    student: StudentConfig = field(default_factory=StudentConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        first = ("name", "key")  # teachers read best name-first
        data["teachers"] = [
            {**{k: t[k] for k in first}, **{k: v for k, v in t.items() if k not in first}} for t in data["teachers"]
        ]
        return data

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=RecipeDumper, sort_keys=False)


# numbers with an exponent but no dot or no signed exponent (`1e-3`, `1e5`), which YAML 1.1 reads as strings and
# sak's recipe loader (`StrictLoader`) as numbers, as YAML 1.2 does
# (every digit run starts with a digit: `._e5` or `0x_`, underscores alone, are strings, where they crashed the
# reader with a ValueError naming neither the file nor the key)
EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
YAML12_INT = re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F][0-9a-fA-F_]*|0o[0-7][0-7_]*)$")  # sak's ints
# YAML 1.1's float pattern without its base-60 form (`1:30.5` was 90.5): how sak's loader reads dotted floats
DOTTED_FLOAT = re.compile(
    r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|[-+]?\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class RecipeDumper(yaml.SafeDumper):
    """YAML's safe dumper, quoting a string that sak's loader would read as a number (a run named `1e5`), so
    that a written recipe.yaml reads back as it was."""


RecipeDumper.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789."))
RecipeDumper.add_implicit_resolver("tag:yaml.org,2002:float", DOTTED_FLOAT, list("-+0123456789."))  # (-.5 quoted)
# and integers: a string YAML 1.1 does not take for one but sak's loader does (`0o17`) is quoted too (the
# dumper keeps YAML 1.1's patterns as well, so what either reader would take for a number is quoted)
RecipeDumper.add_implicit_resolver("tag:yaml.org,2002:int", YAML12_INT, list("-+0123456789"))
