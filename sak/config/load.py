"""Reading a recipe: strict YAML, `key=value` overrides, plug-in imports, and validation across sections."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..teachers.weights import refuse_loader_kwargs
from .overrides import apply_override
from .plugins import import_plugins
from .schema import (
    LossConfig,
    Recipe,
    RecipeError,
    ScheduleConfig,
    StudentConfig,
    TeacherConfig,
)
from .structure import _convert, build_options, structure
from .yaml_read import StrictLoader, refuse_keys_without_values, unshared


def _expand_home(recipe: Recipe) -> None:
    """`~` in the recipe's paths is the home folder, as in teachers' weights and student.pretrained (it made a
    folder named `~` in the current directory for run.output_dir)."""
    r = recipe
    fields = [
        (r.run, "output_dir"),
        (r.data, "root"),
        (r.data, "subset"),
        (r.cache, "path"),
        (r.checkpoint, "init_from"),
    ]
    if r.checkpoint.resume not in ("auto", "never"):
        fields.append((r.checkpoint, "resume"))
    # an empty value (`cache.path=` on the command line) is the current directory to every file call: refused here,
    # where it names the key, not later as "'.' is not a complete teacher-feature cache"
    # (run.output_dir "" is the current directory, which older recipes wrote as `output_dir: ''`: allowed)
    empty = [(section, key) for section, key in [*fields[1:], (r.student, "pretrained")] if getattr(section, key) == ""]
    empty += [(t, "weights") for t in r.teachers if t.weights == ""]
    if empty:
        section, key = empty[0]
        where = next((f"teachers[{i}]" for i, t in enumerate(r.teachers) if t is section), None)
        name = f"{where or type(section).__name__.removesuffix('Config').lower()}.{key}"
        unset = {"resume": "'auto' or 'never'", "output_dir": "leave it out for 'runs'"}.get(
            key, "null to leave it unset"
        )
        raise RecipeError(f"{name}: an empty value names no file or folder; give a path, or {unset}")
    for section, key in fields:
        value = getattr(section, key)
        if value is None or not value.startswith("~"):
            continue
        literal = Path(value.split("/")[0])
        if literal.exists():  # an older sak made and used this folder: its runs or cache are there
            raise RecipeError(
                f"{type(section).__name__.removesuffix('Config').lower()}.{key}: {value!r} is the home folder's "
                f"{os.path.expanduser(value)}, but a folder {str(literal.resolve())!r} exists here (older sak versions "
                "wrote there): move it, or name the path you mean without ~"
            )
        setattr(section, key, os.path.expanduser(value))


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


def _inherits_bare_init(cls: type) -> bool:
    """Whether `cls` takes its __init__ from `object` or torch's `nn.Module`, which take no options."""
    import torch

    owner = next(c for c in cls.__mro__ if "__init__" in vars(c))
    return owner in (object, torch.nn.Module)


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
    if inspect.isclass(fn) and _inherits_bare_init(fn):  # nn.Module's (*args, **kwargs) would accept anything
        params = {}
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
    """Check every registry name and every plug-in's options, and every number's range, before any work starts."""
    _check_names(recipe)
    _check_stage(recipe)
    _check_precision(recipe)
    _check_numbers(recipe)
    _check_schedule(recipe)
    _check_lora(recipe)
    _check_plain(recipe.to_dict(), "")


def _check_plain(value: Any, where: str) -> None:
    """Every value a plain YAML one (string, number, boolean, null, list, mapping): the run records hold the recipe
    as JSON, which an explicitly tagged `!!set`, `!!binary` or `!!timestamp` in a free-form mapping (model_kwargs,
    options) broke when training started."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise RecipeError(f"{where}: {value!r} is a {type(value).__name__}; a recipe holds strings, numbers, booleans, "
                          "lists and mappings (quote it, or write a list)")  # fmt: skip


def _check_lora(recipe: Recipe) -> None:
    """`student.lora` is peft's LoraConfig as keywords: built here, so that a misspelt key is named by the recipe
    check rather than by training once the teachers are loaded (or downloaded)."""
    lora = recipe.student.lora
    if not lora:
        return
    from peft import LoraConfig

    known = [f.name for f in dataclasses.fields(LoraConfig) if f.init]
    unknown = [k for k in lora if k not in known]
    if unknown:
        close = {k: difflib.get_close_matches(str(k), known, n=1) for k in unknown}
        hint = "; ".join(f"did you mean {c[0]!r} for {k!r}?" for k, c in close.items() if c)
        raise RecipeError(f"student.lora: unknown key(s) {unknown} of peft's LoraConfig{'; ' + hint if hint else ''} "
                          "(its keys: r, lora_alpha, lora_dropout, target_modules, ...)")  # fmt: skip
    try:
        config = LoraConfig(**lora)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"student.lora {lora}: {exc}") from None
    # injected into the stem's ViT built on the meta device (no memory, no weights): peft checks r, the dropout
    # and the target modules only there, which training reached after loading every teacher
    import timm
    import torch
    from peft import inject_adapter_in_model

    s = recipe.student
    try:
        with torch.device("meta"):
            vit = timm.create_model(s.model, pretrained=False, num_classes=0, **s.model_kwargs)
    except Exception:  # noqa: BLE001 - the student's own settings are checked (and named) where it is built
        return
    try:
        inject_adapter_in_model(config, vit)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"student.lora {lora}: {exc}") from None


def _check_registered(registry, name: str, where: str):
    if name not in registry:
        known = ", ".join(registry.names())
        raise RecipeError(
            f"{where}: unknown {registry.kind} {name!r}; known names: {known}. "
            "If it lives in a plug-in module, list that module under `imports:`."
        )
    return registry.get(name)


def _check_stage(recipe: Recipe) -> None:
    stage = recipe.run.stage
    if stage == "distill" and not recipe.teachers:
        raise RecipeError("teachers: a distillation recipe (run.stage: distill) needs at least one teacher")
    if stage == "distill" and recipe.tasks:  # (the tasks were trained, as in stage 2, without a word)
        raise RecipeError(
            f"tasks: a distillation recipe (run.stage: distill, stage 1) trains no tasks, but it lists "
            f"{[t.name for t in recipe.tasks]}; set run.stage=multitask to train them (stage 2), or remove them"
        )
    if stage == "multitask" and not recipe.tasks:
        raise RecipeError("tasks: a multi-task recipe (run.stage: multitask) needs at least one task")
    if recipe.student.freeze == "all_but_routers" and not recipe.tasks:  # (a raw autograd error at step 1)
        raise RecipeError("student.freeze: all_but_routers trains only the routers and task heads, which a recipe "
                          "without tasks (stage 1) does not have; use none, or stem (with student.lora to train)")  # fmt: skip


def _check_names(recipe: Recipe) -> None:
    """Registry names (teachers, adapters, tasks, dataset, loss, router, student) and their options."""
    from ..registry import ADAPTERS, DATASETS, LOSSES, ROUTERS, STUDENTS, TASKS, TEACHERS

    seen = set()
    try:
        refuse_loader_kwargs(recipe.student.model_kwargs, "student.model_kwargs", "student.pretrained")
        for i, t in enumerate(recipe.teachers):
            refuse_loader_kwargs(
                t.options.get("model_kwargs"), f"teachers[{i}].options.model_kwargs", f"teachers[{i}].weights"
            )
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    for i, t in enumerate(recipe.teachers):
        cls = _check_registered(TEACHERS, t.name, f"teachers[{i}].name")
        taken = sorted({"name", "weights", "spec"} & set(t.options))  # create_teacher's own arguments
        if taken:  # (a plug-in's option `weights` silently became the teacher's weights file; `name` a TypeError)
            raise RecipeError(f"teachers[{i}].options.{taken[0]}: sak passes a teacher's options beside its name, "
                              "weights and spec, so no option can be called name, weights or spec (rename the "
                              f"field of {t.name}'s Options; the teacher's file is teachers[{i}].weights)")  # fmt: skip
        build_options(cls, t.options, f"teachers[{i}]")
        if t.resize == "keep" and not getattr(cls, "takes_resize_keep", False):  # (before weights are fetched)
            able = sorted(n for n in TEACHERS.names() if getattr(TEACHERS.get(n), "takes_resize_keep", False))
            raise RecipeError(f"teachers[{i}].resize: teacher {t.name!r} sizes its input itself; 'keep' is for "
                              f"{', '.join(able)} (dinov2 and clip with their timm source; a plug-in that sets "
                              "takes_resize_keep)")  # fmt: skip
        _check_registered(ADAPTERS, t.adapter, f"teachers[{i}].adapter")
        if t.id in seen:
            raise RecipeError(f"teachers[{i}]: two teachers are called {t.id!r}; give one a distinct `key:`")
        # it names a module of the student (torch refuses a dot) and the feature cache's tensors ("<key>/<level>")
        if not t.id or "." in t.id or "/" in t.id:
            better = t.id.replace(".", "_").replace("/", "_") or "dinov2"
            raise RecipeError(f"teachers[{i}].key: {t.id!r} names the teacher's outputs and adapter path; give a "
                              f"non-empty name without '.' or '/', e.g. {better!r}")  # fmt: skip
        seen.add(t.id)
    names, heads = set(), []
    for i, task in enumerate(recipe.tasks):
        cls = _check_registered(TASKS, task.name, f"tasks[{i}].name")
        if task.name in names:
            raise RecipeError(f"tasks[{i}]: the task {task.name!r} is listed twice; give each task once")
        names.add(task.name)
        try:
            heads.append(cls(channels=task.channels, weight=task.weight))
        except ValueError as exc:
            raise RecipeError(f"tasks[{i}] ({task.name}): {exc}") from None
    dataset = _check_registered(DATASETS, recipe.data.name, "data.name")
    build_options(dataset, recipe.data.options, "data")
    supported = getattr(dataset, "supported_tasks", None)
    if isinstance(supported, tuple):  # declared on the class (a plug-in may decide per instance instead)
        missing = [t.name for t in recipe.tasks if t.name not in supported]
        if missing:
            raise RecipeError(
                f"tasks: data.name {recipe.data.name!r} has no targets for {missing}; it has "
                f"{list(supported) or 'none (images only: a stage-1 dataset)'}"
            )
    classes = getattr(dataset, "task_classes", None)
    for i, (task, head) in enumerate(zip(recipe.tasks, heads, strict=True)):
        count = classes.get(task.name) if isinstance(classes, dict) else None
        if count is not None and head.channels != count:  # a class index past the head: an IndexError (CUDA:
            raise RecipeError(  # a device-side assert) at the first step, or channels never trained
                f"tasks[{i}] ({task.name}): the head would predict {head.channels} channels"
                f"{'' if task.channels is not None else ' (the default)'}, but {recipe.data.name} has {count} "
                f"classes; set channels: {count}"
            )
    loss = _check_registered(LOSSES, recipe.loss.distill, "loss.distill")
    recipe.loss.options = _check_keywords(loss, recipe.loss.options, "loss.options")
    if loss.__module__.startswith("sak."):  # its values too: a built-in loss checks its ranges when built (and
        try:  # holds no weights); a plug-in's constructor may do anything, and runs when training builds it
            loss(**recipe.loss.options)
        except (ValueError, TypeError) as exc:
            raise RecipeError(str(exc)) from exc
    _check_registered(ROUTERS, recipe.student.router, "student.router")
    student = _check_registered(STUDENTS, recipe.student.architecture, "student.architecture")
    if not getattr(student, "has_adapter_paths", True):
        for i, t in enumerate(recipe.teachers):
            if t.adapter != TeacherConfig.adapter:
                raise RecipeError(
                    f"teachers[{i}].adapter: {t.adapter!r} would go unused: student.architecture "
                    f"{recipe.student.architecture!r} has no adapter paths; leave it out"
                )
        defaults = StudentConfig()
        for key in ("router", "down_ratio", "aligner"):  # the SAK student's parts, which this one does not have
            if getattr(recipe.student, key) != getattr(defaults, key):
                raise RecipeError(
                    f"student.{key}: {getattr(recipe.student, key)!r} would go unused: student.architecture "
                    f"{recipe.student.architecture!r} has no adapter paths, aligners or routers; leave it out"
                )


def _check_precision(recipe: Recipe) -> None:
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
    if recipe.data.prefetch_to_device is True and recipe.optim.grad_accum != 1:
        raise RecipeError(
            f"data.prefetch_to_device: needs optim.grad_accum=1, got {recipe.optim.grad_accum}: reading a batch ahead "
            "moves Accelerate's end of epoch one batch early, which would end an accumulation early; turn one off"
        )


def _check_schedule(recipe: Recipe) -> None:
    s, loss = recipe.schedule, recipe.loss
    if (s.max_steps is None) == (s.epochs is None):
        raise RecipeError(
            "schedule: give exactly one of schedule.max_steps and schedule.epochs (set the other to null), got "
            f"max_steps {s.max_steps} and epochs {s.epochs}"
        )
    if s.warmup_steps and s.warmup_epochs:  # (warmup_steps won, and warmup_epochs went unused without a word)
        raise RecipeError(
            f"schedule: give at most one of schedule.warmup_steps ({s.warmup_steps}) and schedule.warmup_epochs "
            f"({s.warmup_epochs}); set the other to 0"
        )
    if not math.isfinite(s.min_lr) or s.min_lr < 0 or (s.name == "cosine" and s.min_lr > recipe.optim.lr):
        raise RecipeError(
            f"schedule.min_lr: the cosine floor must be in [0, optim.lr = {recipe.optim.lr}], got {s.min_lr}"
        )  # fmt: skip  (a floor above lr made it rise)
    if not math.isfinite(s.warmup_epochs):
        raise RecipeError(f"schedule.warmup_epochs: must be a finite number, got {s.warmup_epochs}")
    defaults = ScheduleConfig()
    unused = {"min_lr": s.name != "cosine", "power": s.name != "poly"}  # (mmseg's poly has a floor; ours does not)
    for key, unused_here in unused.items():
        if unused_here and getattr(s, key) != getattr(defaults, key):
            raise RecipeError(f"schedule.{key}: {getattr(s, key)} would go unused with schedule.name {s.name!r} "
                              f"({'the cosine floor' if key == 'min_lr' else 'the poly exponent'}); leave it out")  # fmt: skip
    if not recipe.tasks and loss.alpha != LossConfig.alpha:
        raise RecipeError(f"loss.alpha: {loss.alpha} weighs the distillation loss against the task losses, and "
                          "this recipe has no tasks (stage 1 trains the distillation loss alone); leave it out")  # fmt: skip
    if loss.normalize == "none":
        unused = [k for k in ("normalize_every", "normalize_until") if getattr(loss, k) != "auto"]
        if unused:
            raise RecipeError(f"loss.{unused[0]}: {getattr(loss, unused[0])!r} would go unused with loss.normalize: "
                              "none; set loss.normalize (standardize or phi_s), or leave it out")  # fmt: skip


def _check_numbers(recipe: Recipe) -> None:
    """Counts at least their minimum, and the optimiser's and losses' numbers finite and in range: a negative
    optim.grad_clip, say, turned every step into gradient ascent without an error."""
    s, o = recipe.schedule, recipe.optim
    at_least = {
        "data.batch_size": (recipe.data.batch_size, 1),
        "data.image_size": (recipe.data.image_size, 1),
        "data.num_workers": (recipe.data.num_workers, 0),
        "optim.grad_accum": (o.grad_accum, 1),
        "optim.max_nonfinite": (o.max_nonfinite, 1),
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
        "run.seed": (recipe.run.seed, 0),
        "student.down_ratio": (recipe.student.down_ratio, 1),
        "loss.normalize_every": (recipe.loss.normalize_every if recipe.loss.normalize_every != "auto" else None, 1),
        "loss.normalize_until": (
            recipe.loss.normalize_until if isinstance(recipe.loss.normalize_until, int) else None,
            1,
        ),
        **{f"teachers[{i}].image_size": (t.image_size, 1) for i, t in enumerate(recipe.teachers)},
    }
    for key, (value, low) in at_least.items():
        if value is not None and value < low:
            raise RecipeError(f"{key}: must be at least {low}, got {value}")
    if recipe.run.seed >= 2**32:  # (numpy's own error would not name the key)
        raise RecipeError(f"run.seed: must be below 2**32, got {recipe.run.seed}")
    name = recipe.run.name
    # (an empty name made the output folder itself the run directory, whose fresh start set other runs' folders
    # aside; a NUL or a name past 255 bytes, which no file system takes, failed with an OSError naming no key)
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or len(name.encode()) > 255:
        raise RecipeError(f"run.name: {name[:80]!r} names the run's folder under run.output_dir: one non-empty folder "
                          "name of at most 255 bytes, not . or .. and without / or a NUL")  # fmt: skip
    for key, split in (("data.split", recipe.data.split), ("eval.split", recipe.eval.split)):
        parts = split.replace("\\", "/").split("/")
        if not split.strip() or split.startswith(("/", "\\")) or any(p in ("", ".", "..") for p in parts):
            # (an image folder's split is a folder under data.root: "", "." or "train/.." read the whole root,
            # the validation images with it, as a shell variable left unset gives `data.split=`)
            raise RecipeError(f"{key}: {split!r} names no split: a split name (train, val) or, for an image "
                              "folder, a folder under data.root, without . or .. or a leading /")  # fmt: skip
    size = recipe.student.input_size
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise RecipeError(f"student.input_size: [height, width] in pixels, or null for data.image_size; got {size}")
    if recipe.student.levels is not None and not recipe.student.levels:
        raise RecipeError("student.levels: give the stem blocks that feed the levels, or null for evenly spaced ones")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise RecipeError(f"optim.betas: two numbers in [0, 1), e.g. [0.9, 0.999]; got {o.betas}")
    positive = {"optim.lr": o.lr, "optim.eps": o.eps, "optim.grad_clip": o.grad_clip, "schedule.power": s.power}
    non_negative = {"optim.weight_decay": o.weight_decay, "loss.alpha": recipe.loss.alpha,
                    "eval.keep_targets_gib": recipe.eval.keep_targets_gib}  # fmt: skip
    non_negative |= {f"tasks[{i}].weight": t.weight for i, t in enumerate(recipe.tasks)}
    for key, value in (positive | non_negative).items():
        low_ok = value is None or (value > 0 if key in positive else value >= 0)
        if not low_ok or (value is not None and not math.isfinite(value)):
            what = "positive" if key in positive else "zero or more"
            raise RecipeError(f"{key}: must be a finite number, {what}, got {value}")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, type-check and validate a recipe. Every error names `path`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); a recipe is YAML") from None
    try:
        data = unshared(yaml.load(text, Loader=StrictLoader) or {})
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    except ValueError as exc:  # PyYAML's int() of a number past Python's 4300-digit limit
        raise RecipeError(f"{path}: a value YAML cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    try:
        for override in overrides:
            apply_override(data, override)
        refuse_keys_without_values(data, "")
        _import_builtins()
        imports = data.get("imports") or []
        if not isinstance(imports, list):
            raise RecipeError("imports: expected a list of module names")
        import_plugins(imports)
        recipe = structure(Recipe, data)
        _expand_home(recipe)
        validate(recipe)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    return recipe
