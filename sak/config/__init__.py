"""Recipes: YAML mapped onto typed dataclasses, with `key=value` overrides and strict validation.

A recipe is data. The only code it can bring in is the plug-in modules it lists under `imports:`;
every other name resolves through a registry. Unknown keys, wrong types, bad values and unknown
registry names are errors that name the file, the key path and what would be right.

The package: `schema` (the sections' dataclasses), `structure` (dict -> dataclass, typed), `load` (YAML,
overrides, imports, validation, `load_recipe`).
"""

from .load import StrictLoader, apply_override, load_recipe, validate
from .plugins import import_plugins
from .schema import (
    CUDA_GRAPH_MODES,
    CacheConfig,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    LossConfig,
    OptimConfig,
    PrecisionConfig,
    Recipe,
    RecipeError,
    RunConfig,
    ScheduleConfig,
    StudentConfig,
    TaskConfig,
    TeacherConfig,
    WandbConfig,
)
from .structure import build_options, structure

__all__ = [
    "CUDA_GRAPH_MODES",
    "CacheConfig",
    "CheckpointConfig",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "LossConfig",
    "OptimConfig",
    "PrecisionConfig",
    "Recipe",
    "RecipeError",
    "RunConfig",
    "ScheduleConfig",
    "StrictLoader",
    "StudentConfig",
    "TaskConfig",
    "TeacherConfig",
    "WandbConfig",
    "apply_override",
    "build_options",
    "import_plugins",
    "load_recipe",
    "structure",
    "validate",
]
