"""glibc malloc settings for training on the CPU.

By default glibc serves every allocation above its mmap threshold (128 KiB at start; it adapts upwards
only in some cases) with a fresh mmap, and gives memory at the top of the heap back to the OS once more
than a trim threshold of it is free. A training step on the CPU allocates and frees the same large tensors
every step (activations, a teacher-sized upsampled student map, its gradient), so every step page-faults
them in again from zeroed pages: 2-10% of the demo's stage-1 step over eight runs (0.588 against 0.567 s
in the latest benchmarks/results/throughput_cpu.md, the `glibc-default` row). Raising the mmap threshold
to 32 MiB (the most that glibc 2.26-2.34 accept on 64-bit; see MMAP_THRESHOLD) and the trim threshold to
2 GiB keeps freed memory in the process for the next step. This is the effect PyTorch's CPU performance guides get by preloading jemalloc or tcmalloc;
mallopt does it from inside the process, with nothing to install.

The price is that memory freed inside a run is not handed back to the OS until the process ends: peak
resident memory is unchanged (it is the same tensors), but resident memory stays near the peak. The
trainer applies it only when it trains on the CPU and `run.tune_malloc` is true (the default); other
processes and GPU runs are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
# glibc 2.26-2.34 refuse more than HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit. Later versions accept more (2.36 takes
# 1 GiB, and then serves a 100 MiB block from the heap instead of a fresh mapping), but 1 GiB made no difference
# measured on a ViT-B-sized CPU step (benchmarks.student_step at 192 px, batch 4: 730k against 750k minor page
# faults over the run, step times within the run-to-run spread; 2026-11-27): 32 MiB, which every glibc takes.
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set the thresholds once per process; True when glibc accepted them, False where there is no glibc
    mallopt (macOS, Windows, musl) and nothing was changed."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _applied
