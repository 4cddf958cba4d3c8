"""The SAK student: stem (TAS), adapter paths (TSAP), MoR routers, heads."""

from . import adapters, router  # noqa: F401  (register built-in adapters and routers)
from .model import SAKStudent, StudentOutput, TeacherSlot, parameter_report
from .stem import TeacherAgnosticStem

__all__ = ["SAKStudent", "StudentOutput", "TeacherAgnosticStem", "TeacherSlot", "parameter_report"]
