"""sak: distil several frozen vision foundation models into one multi-task dense student."""

__version__ = "0.1.0"


def create_teacher(*args, **kwargs):
    """See `sak.teachers.create_teacher`."""
    from .teachers import create_teacher as _create

    return _create(*args, **kwargs)


def list_teachers() -> list[str]:
    from .teachers import list_teachers as _list

    return _list()


__all__ = ["__version__", "create_teacher", "list_teachers"]
