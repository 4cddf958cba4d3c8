"""Recipes: YAML mapped onto typed dataclasses, with `key=value` overrides and strict validation.

A recipe is data. The only code it can bring in is the plug-in modules it lists under `imports:`;
every other name resolves through a registry. Unknown keys, wrong types, bad values and unknown
registry names are errors that name the file, the key path and what would be right.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .teachers.base import TeacherSpec


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the key path."""


# ----------------------------------------------------------------------------------------------
# The recipe schema
# ----------------------------------------------------------------------------------------------
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
    model_kwargs: dict = field(default_factory=dict)
    levels: list[int] | None = None  # stem blocks that feed the 4 output levels; None = evenly spaced
    down_ratio: int = 4  # TSAP adapter bottleneck ratio r
    aligner: Literal["auto", "always"] = "auto"  # auto: only when the widths differ
    router: str = "noisy"  # MoR router type (registry of routers): noisy, none, pixel
    freeze: Literal["none", "stem", "all_but_routers"] = "none"  # what stays fixed (the official code's options)
    # recompute each stem block's and adapter's activations in backward instead of keeping them from the forward:
    # less memory, one more forward of the blocks and adapters per step
    grad_checkpointing: bool = False
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
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float | None = None  # max global grad norm; None = no clipping
    grad_accum: int = 1
    fused: bool = True  # AdamW's fused kernel (all parameters in one pass); false = PyTorch's default loop
    max_nonfinite: int = 5  # stop after this many consecutive non-finite losses


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
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# dict -> dataclass, checking every key and type
# ----------------------------------------------------------------------------------------------
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arm, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false (`precision.mixed: no`)
            value = "no"
        if value not in args:
            raise RecipeError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return structure(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r} ({type(value).__name__})")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r} ({type(value).__name__})")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r} ({type(value).__name__})")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.match(value.strip()):  # YAML 1.1 reads 1e-4 as a string
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    raise RecipeError(f"{where}: unsupported field type {tp!r}")  # a schema bug, not a user error


def structure(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping of keys for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ";"
            raise RecipeError(f"unknown key {path!r}{hint} valid keys here: {', '.join(fields) or '(none)'}")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def build_options(owner: type, options: dict, where: str) -> Any:
    """The `Options` dataclass of a registered class (teacher, dataset, ...) from a recipe mapping."""
    return structure(getattr(owner, "options_type", owner.Options), options or {}, f"{where}.options")


# ----------------------------------------------------------------------------------------------
# overrides, imports, loading and validation
# ----------------------------------------------------------------------------------------------
class StrictLoader(yaml.SafeLoader):
    """YAML's safe loader (plain data, no tags that run code) that refuses a key given twice in one mapping:
    PyYAML would keep the last silently, e.g. a second `optim:` section replacing the first. Merge keys
    (`<<: *anchor`) work as in YAML: the mapping's own keys win over the merged ones."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # merged by SafeLoader below, not a key of its own
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found a {type(key).__name__} as a key",
                    key_node.start_mark,
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found the key {key!r} twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.1 (PyYAML) reads a float only with a dot and a signed exponent: `1e-3`, `1e5` and `1.0e5` stay strings.
# Typed recipe fields convert them, but mappings passed on as they are (model_kwargs, lora) would not, and the
# string fails deep inside the model ("linspace() received an invalid combination of arguments"). Read them as
# YAML 1.2 does; integers are matched first, by the resolver PyYAML registers before this one.
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _unshared(value: Any) -> Any:
    """A copy without shared containers: YAML anchors, aliases and merge keys give several places in a recipe the
    same dict or list, so an override of one (`teachers.1.options.model_kwargs.embed_dim=64`) changed the other."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


def _list_example(keys: list[str]) -> str:
    """An example value for the recipe list at `keys` ("tasks", "student.levels"): `[{name: ...}]` for a list
    of sections with a `name`, `[{...}]` for other sections, `[...]` for values (or a path the schema lacks)."""
    tp: Any = Recipe
    for key in keys:
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if key not in hints:
            return "[...]"
        tp = hints[key]
        if typing.get_origin(tp) in (Union, types.UnionType):  # `list[int] | None`
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    item = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
    if dataclasses.is_dataclass(item):
        return "[{name: ...}]" if "name" in {f.name for f in dataclasses.fields(item)} else "[{...}]"
    return "[...]"


def apply_override(data: dict, override: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML; list items addressed by index: teachers.0.weights)."""
    if "=" not in override:
        raise RecipeError(f"override {override!r} is not of the form key.path=value")
    path, raw = override.split("=", 1)
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {override!r}: the value is not valid YAML ({exc})") from None
    keys = path.strip().split(".")
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not (key.isascii() and key.isdigit()) or int(key) >= len(node):
                raise RecipeError(
                    f"override {override!r}: {'.'.join(keys[:i])} has {len(node)} items; {key!r} is not an index"
                )
            key = int(key)
            if last:
                node[key] = value
            else:
                if node[key] is None:  # an item left empty in the file (`teachers: [~]`)
                    node[key] = {}
                node = node[key]
                if not isinstance(node, (dict, list)):
                    raise RecipeError(f"override {override!r}: {'.'.join(keys[: i + 1])} is a value, not a section")
            continue
        if last:
            node[key] = value
        else:
            if node.get(key) is None:  # absent, or a section left empty in the file (`cache:`)
                if keys[i + 1].isdigit():  # an item of a list that is not there (stage 1's tasks)
                    section = ".".join(keys[: i + 1])
                    raise RecipeError(
                        f"override {override!r}: {section} has no items; give the whole list, e.g. "
                        f"'{section}={_list_example(keys[: i + 1])}'"
                    )
                node[key] = {}
            node = node[key]
            if not isinstance(node, (dict, list)):
                raise RecipeError(f"override {override!r}: {'.'.join(keys[: i + 1])} is a value, not a section")


def import_plugins(modules: list[str], where: str = "imports") -> None:
    """Import plug-in modules named by a recipe (in every process); the one way a recipe runs code."""
    for i, name in enumerate(modules):
        if not isinstance(name, str) or not name or name.startswith("."):
            raise RecipeError(
                f"{where}[{i}]: {name!r} is not a module name; give an absolute dotted name, e.g. my_pkg.teachers"
            )
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise RecipeError(f"{where}[{i}]: cannot import plug-in module {name!r}: {exc}") from exc
        except ValueError as exc:  # a name registered twice (two modules, or a module under two names)
            raise RecipeError(f"{where}[{i}]: plug-in module {name!r}: {exc}") from exc


def _import_builtins() -> None:
    # The built-in registries fill at import; importing here keeps `sak.config` light for callers.
    for module in ("sak.teachers", "sak.tasks", "sak.data", "sak.losses", "sak.student"):
        importlib.import_module(module)


def _convertible(tp: Any) -> bool:
    """Whether `_convert` knows annotation `tp` (a plug-in's keyword may be annotated with anything)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp in (bool, int, float, str, dict) or origin is Literal or dataclasses.is_dataclass(tp):
        return True
    if origin in (Union, types.UnionType, list, dict):
        return all(_convertible(a) for a in args if a is not type(None))
    return False


def _check_keywords(fn, options: dict, where: str) -> dict:
    """`options` must be keyword arguments `fn` (a registered class) accepts: a wrong key is an error here,
    with the accepted ones listed, not a TypeError when the run builds it. Values are converted to the
    keywords' annotations where `_convert` knows them (YAML 1.1 reads `1e-3` as a string), and a value of
    the wrong type is an error naming the key; returns the converted options."""
    options = dict(options or {})
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to check against (a C extension, say)
        return options
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # annotations that do not resolve (a plug-in's forward reference): left unchecked
        hints = {}
    for key, value in options.items():
        if key in params and key in hints and _convertible(hints[key]):
            options[key] = _convert(value, hints[key], f"{where}.{key}")
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return options
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in options:
        if key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ";"
            raise RecipeError(f"unknown key {where}.{key}{hint} valid keys here: {', '.join(accepted) or '(none)'}")
    return options


def validate(recipe: Recipe) -> None:
    """Check every registry name and every plug-in's options before any work starts."""
    from .registry import DATASETS, LOSSES, ROUTERS, STUDENTS, TASKS, TEACHERS

    def check(registry, name: str, where: str):
        if name not in registry:
            known = ", ".join(registry.names())
            raise RecipeError(
                f"{where}: unknown {registry.kind} {name!r}; known names: {known}. "
                "If it lives in a plug-in module, list that module under `imports:`."
            )
        return registry.get(name)

    from .registry import ADAPTERS

    if recipe.run.stage == "distill" and not recipe.teachers:
        raise RecipeError("teachers: a distillation recipe (run.stage: distill) needs at least one teacher")
    if recipe.run.stage == "multitask" and not recipe.tasks:
        raise RecipeError("tasks: a multi-task recipe (run.stage: multitask) needs at least one task")
    seen = set()
    for i, t in enumerate(recipe.teachers):
        cls = check(TEACHERS, t.name, f"teachers[{i}].name")
        build_options(cls, t.options, f"teachers[{i}]")
        check(ADAPTERS, t.adapter, f"teachers[{i}].adapter")
        if t.id in seen:
            raise RecipeError(f"teachers[{i}]: two teachers are called {t.id!r}; give one a distinct `key:`")
        seen.add(t.id)
    names = set()
    for i, task in enumerate(recipe.tasks):
        check(TASKS, task.name, f"tasks[{i}].name")
        if task.name in names:
            raise RecipeError(f"tasks[{i}]: the task {task.name!r} is listed twice; give each task once")
        names.add(task.name)
    p = recipe.precision
    if p.teacher_weights == "cast" and p.teacher_precision in ("no", "fp32"):
        raise RecipeError(
            f"precision.teacher_weights: cast needs bf16 or fp16 teachers, but precision.teachers is {p.teachers!r}"
            + (f" and precision.mixed {p.mixed!r}" if p.teachers == "auto" else "")
            + "; set precision.teachers=bf16 (or fp16 on a GPU), or teacher_weights=autocast"
        )
    if p.compile_mode != "default" and not (p.compile_student or p.compile_teachers or p.compile_losses):
        raise RecipeError(
            f"precision.compile_mode: {p.compile_mode!r} applies to what is compiled, and nothing is; set "
            "precision.compile_student, compile_teachers or compile_losses to true, or leave compile_mode default"
        )
    dataset = check(DATASETS, recipe.data.name, "data.name")
    build_options(dataset, recipe.data.options, "data")
    supported = getattr(dataset, "supported_tasks", None)
    if isinstance(supported, tuple):  # declared on the class (a plug-in may decide per instance instead)
        missing = [t.name for t in recipe.tasks if t.name not in supported]
        if missing:
            raise RecipeError(
                f"tasks: data.name {recipe.data.name!r} has no targets for {missing}; it has "
                f"{list(supported) or 'none (images only: a stage-1 dataset)'}"
            )
    loss = check(LOSSES, recipe.loss.distill, "loss.distill")
    recipe.loss.options = _check_keywords(loss, recipe.loss.options, "loss.options")
    check(ROUTERS, recipe.student.router, "student.router")
    student = check(STUDENTS, recipe.student.architecture, "student.architecture")
    if not getattr(student, "has_adapter_paths", True):
        for i, t in enumerate(recipe.teachers):
            if t.adapter != TeacherConfig.adapter:
                raise RecipeError(
                    f"teachers[{i}].adapter: {t.adapter!r} would go unused: student.architecture "
                    f"{recipe.student.architecture!r} has no adapter paths; leave it out"
                )
    s = recipe.schedule
    if (s.max_steps is None) == (s.epochs is None):
        raise RecipeError("schedule: give exactly one of schedule.max_steps and schedule.epochs")
    if s.warmup_steps and s.warmup_epochs:  # (warmup_steps won, and warmup_epochs went unused without a word)
        raise RecipeError(
            f"schedule: give at most one of schedule.warmup_steps ({s.warmup_steps}) and schedule.warmup_epochs "
            f"({s.warmup_epochs}); set the other to 0"
        )
    at_least = {
        "data.batch_size": (recipe.data.batch_size, 1),
        "data.image_size": (recipe.data.image_size, 1),
        "data.num_workers": (recipe.data.num_workers, 0),
        "optim.grad_accum": (recipe.optim.grad_accum, 1),
        "optim.max_nonfinite": (recipe.optim.max_nonfinite, 1),
        "schedule.max_steps": (s.max_steps, 1),
        "schedule.epochs": (s.epochs, 1),
        "schedule.warmup_steps": (s.warmup_steps, 0),
        "schedule.warmup_epochs": (s.warmup_epochs, 0),
        "eval.every": (recipe.eval.every, 0),
        "eval.batches": (recipe.eval.batches, 0),
        "eval.batch_size": (recipe.eval.batch_size, 1),
        "checkpoint.every": (recipe.checkpoint.every, 0),
        "checkpoint.keep_last": (recipe.checkpoint.keep_last, 0),
        "logging.every": (recipe.logging.every, 1),
        "run.stop_at": (recipe.run.stop_at, 1),
        "loss.normalize_every": (recipe.loss.normalize_every if recipe.loss.normalize_every != "auto" else None, 1),
        "loss.normalize_until": (
            recipe.loss.normalize_until if isinstance(recipe.loss.normalize_until, int) else None,
            1,
        ),
    }
    for key, (value, low) in at_least.items():
        if value is not None and value < low:
            raise RecipeError(f"{key}: must be at least {low}, got {value}")
    betas = recipe.optim.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise RecipeError(f"optim.betas: two numbers in [0, 1), e.g. [0.9, 0.999]; got {betas}")
    if recipe.optim.lr <= 0:
        raise RecipeError(f"optim.lr: must be positive, got {recipe.optim.lr}")
    if recipe.data.prefetch_to_device is True and recipe.optim.grad_accum != 1:
        raise RecipeError(
            f"data.prefetch_to_device: needs optim.grad_accum=1, got {recipe.optim.grad_accum}: reading a batch ahead "
            "moves Accelerate's end of epoch one batch early, which would end an accumulation early; turn one off"
        )


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, type-check and validate a recipe. Every error names `path`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc.strerror}") from exc
    try:
        data = _unshared(yaml.load(text, Loader=StrictLoader) or {})
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    try:
        for override in overrides:
            apply_override(data, override)
        _import_builtins()
        imports = data.get("imports") or []
        if not isinstance(imports, list):
            raise RecipeError("imports: expected a list of module names")
        import_plugins(imports)
        recipe = structure(Recipe, data)
        validate(recipe)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    return recipe
