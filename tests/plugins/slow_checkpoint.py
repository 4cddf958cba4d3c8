"""Test plug-in (named in a recipe's `imports:`): from the second checkpoint on, signal that a
checkpoint is half written, then hang, so that a test can SIGKILL the run mid-write."""

import os
import time
from pathlib import Path

from sak.engine import checkpoint

_original = checkpoint._fsync_tree


def _slow_fsync_tree(path: Path) -> None:
    if path.name.endswith(checkpoint.PARTIAL) and not path.name.startswith("step_00000001"):
        Path(os.environ["SAK_TEST_MARKER"]).write_text(str(path))
        time.sleep(120)
    _original(path)


checkpoint._fsync_tree = _slow_fsync_tree
