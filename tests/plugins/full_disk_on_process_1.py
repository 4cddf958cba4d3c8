"""Test plug-in (named in a recipe's `imports:`): process 1 of a launch meets a full disk at the second
checkpoint's save, while process 0 writes its part, so that a test sees every process stop, none hang."""

import errno
import os

from accelerate import Accelerator

_original = Accelerator.save_state


def _save_state(self, output_dir=None, *args, **kwargs):
    if self.process_index == 1 and not os.path.basename(str(output_dir)).startswith("step_00000001"):
        raise OSError(errno.ENOSPC, "No space left on device", str(output_dir))
    return _original(self, output_dir, *args, **kwargs)


Accelerator.save_state = _save_state
