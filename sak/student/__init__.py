"""The SAK student: stem (TAS), adapter paths (TSAP), MoR routers, heads."""

from ..registry import STUDENTS
from . import adapters, router  # noqa: F401  (register built-in adapters and routers)
from .adapters import TokenGrid
from .baselines import ManyToOneStudent
from .model import SAKStudent, StudentOutput, TeacherSlot, parameter_report
from .stem import TeacherAgnosticStem

STUDENTS.register("sak")(SAKStudent)
STUDENTS.register("many_to_one")(ManyToOneStudent)

__all__ = [
    "ManyToOneStudent",
    "SAKStudent",
    "StudentOutput",
    "TeacherAgnosticStem",
    "TeacherSlot",
    "TokenGrid",
    "parameter_report",
]
