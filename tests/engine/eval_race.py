"""`sak eval` while a training saves a checkpoint into the run directory being scored: process 0, once it has
loaded its student, puts a newer checkpoint there (with damaged weights, so that loading it fails loudly);
process 1 loads its student once that checkpoint is there. For test_task_eval.py's two-process test: each process looked up the
run's latest checkpoint on its own, and scored its share of the images with whichever it found."""

import os
import shutil
import sys
import time
from pathlib import Path

import sak.engine.task_eval as task_eval
from sak.cli import main
from sak.engine.checkpoint import latest_checkpoint

load_student = task_eval.load_student


def racing(recipe, checkpoint):
    if os.environ.get("RANK") == "1":  # once process 0 has put the newer checkpoint there
        run = Path(sys.argv[sys.argv.index("--checkpoint") + 1])
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "step_99999999").is_dir() and time.monotonic() < deadline:
            time.sleep(0.1)
        return load_student(recipe, checkpoint)
    loaded = load_student(recipe, checkpoint)
    run = Path(sys.argv[sys.argv.index("--checkpoint") + 1])
    newer = latest_checkpoint(run / "checkpoints").with_name("step_99999999")
    shutil.copytree(latest_checkpoint(run / "checkpoints"), newer)
    weights = bytearray((newer / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (newer / "model.safetensors").write_bytes(bytes(weights))
    return loaded


task_eval.load_student = racing

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
