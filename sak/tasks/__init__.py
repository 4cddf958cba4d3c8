"""Dense tasks: registry `TASKS`, one `Task` per task."""

from ..registry import TASKS
from . import dense  # noqa: F401  (registers the built-in tasks)
from .base import Task


def create_task(name: str, channels: int | None = None, weight: float | None = None) -> Task:
    return TASKS.get(name)(channels=channels, weight=weight)


__all__ = ["Task", "create_task"]
