"""sha256 of files, shared by weight checks, the teacher-feature cache and the datasets (no heavy imports)."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

from .files import refuse_special_file


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in `chunk`-byte blocks (about 2 GB/s on these CPUs)."""
    refuse_special_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_processes(default: int = 1) -> int:
    """The processes of this launch on this machine (LOCAL_WORLD_SIZE, set by torchrun / accelerate launch), else
    `default`: the CPUs are shared by these, not by every process of a multi-node launch."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or default))
    except ValueError:
        return max(1, default)


def hash_threads(share: int = 1) -> int:
    """Hashing threads for one of `share` processes hashing at once: the usable CPUs, at most 16, divided."""
    return max(1, min(usable_cpus(), 16) // share)


def sha256_files(paths: list, threads: int | None = None) -> list[str]:
    """`sha256_of` each path, in order, `threads` files at a time (default: `hash_threads()`).
    Threads hash in parallel: file reads and hashlib's updates of more than 2 KB release the GIL."""
    paths = list(paths)
    threads = max(1, min(threads or hash_threads(), len(paths)))
    if threads == 1:
        return [sha256_of(p) for p in paths]
    with ThreadPoolExecutor(threads, thread_name_prefix="sha256") as pool:
        return list(pool.map(sha256_of, paths))
