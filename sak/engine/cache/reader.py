"""`FeatureCache`: read a finished cache's rows with one copy (page-locked on a GPU machine), checked against the
sha256 of every shard; `CachedRows`: a batch's rows before they are read, as DataLoader workers hand them on."""

from __future__ import annotations

import json
import math
import os
import threading
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from ...digest import local_processes, sha256_files, usable_cpus
from ...teachers import TeacherOutput
from .identity import _diff, as_now
from .store import CONTENT_PREFIX, REBUILD, CacheError, CachePlan, check_manifest, load_manifest, shard_name

# The caches this process has open, by token: a `FeatureCache` sent to another process (a DataLoader worker)
# and back (inside a batch's `CachedRows`) comes back as the instance the training opened, with its shards
# already verified, not as a copy that would hash them again
_OPEN: weakref.WeakValueDictionary[str, FeatureCache] = weakref.WeakValueDictionary()


_OPEN_LOCK = threading.Lock()


# threads reading a batch's rows into page-locked memory for the DataLoader's pin-memory thread, at most
# (per process: the usable CPUs are shared by the processes of one machine). Two threads read about 7 GB/s
# into reused buffers on the 2-core CPU of benchmarks/results/cache_loader_cpu.md; a GPU's host needs some
# 15 GB/s at SAK's stage-1 scale with a 33 ms cached step
PIN_THREADS = 8


# safetensors' dtype names (the format's header) of what a cache stores
_STORED = {"F16": torch.float16, "I8": torch.int8, "F32": torch.float32}


def pin_threads() -> int:
    """Threads for reading a batch into page-locked memory: PIN_THREADS, or this process's share of the usable
    CPUs when fewer (LOCAL_WORLD_SIZE: the processes torchrun / accelerate start on this machine)."""
    return max(1, min(PIN_THREADS, usable_cpus() // local_processes()))


def _reopen(token: str, root: str, verified: dict[str, tuple] | None = None) -> FeatureCache:
    with _OPEN_LOCK:
        cache = _OPEN.get(token)
    if cache is None:  # a process that did not open it (a worker started by spawn): open it here, same token
        cache = FeatureCache(Path(root), token=token)
        cache._verified.update(verified or {})
    return cache


def _rows(token: str, root: str, indices: list[int], epoch: int) -> CachedRows:
    return CachedRows(_reopen(token, root), indices, epoch)


def _absolute(name: str) -> str:
    """A recorded file name as `file_digests` now gives it: a relative path that exists here, made absolute."""
    return os.path.abspath(name) if not os.path.isabs(name) and os.path.exists(name) else name


class FeatureCache:
    """Reader of a finished cache. A batch's maps are read with one copy, from the shard files straight into
    the batch's tensors (`gather`: a positioned read of each sample's row of each map); on a GPU machine the
    training loader does that in its pin-memory thread, into page-locked memory, from the `CachedRows` its
    workers hand on (`IndexedDataset.collate`). `targets` widens a batch on the device; `lookup` does both."""

    def __init__(self, root: Path, token: str | None = None) -> None:
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            raise CacheError(f"{self.root} is not a complete teacher-feature cache (no manifest.json); "
                             "build it with `sak cache build RECIPE --out DIR`")  # fmt: skip
        self.manifest = load_manifest(manifest)
        if self.manifest.get("status", "complete") != "complete":  # (format 1 wrote its manifest only when done)
            raise CacheError(f"{self.root} is an unfinished teacher-feature cache (its build stopped before the "
                             f"last shard); run the same `sak cache build ... --out {self.root}` again to finish it")  # fmt: skip
        check_manifest(self.manifest, manifest)
        ident = self.manifest["identity"]
        self.views, self.augment, self.shard_size = ident["views"], ident["augment"], self.manifest["shard_size"]
        self.samples = self.manifest["samples"]
        layout = CachePlan(self.root, self.samples, self.shard_size, self.views).shards()
        listed = set(self.manifest["shards"])
        absent = [shard_name(v, k) for v, k in layout if shard_name(v, k) not in listed]
        if absent or len(listed) != len(layout):  # so that verify_all checks every shard training will read
            raise CacheError(f"{manifest} lists {len(listed)} shards where {self.samples} samples in shards of "
                             f"{self.shard_size} x {self.views} view(s) make {len(layout)}"
                             + (f" (no entry for {', '.join(absent[:3])})" if absent else "")
                             + f"; {REBUILD.format(root=self.root)}")  # fmt: skip
        self.teachers = list(self.manifest["level_dims"])
        self.dtype = ident["dtype"]
        # the stored tensors of a sample: "<teacher>/<level>" and, for int8, "<teacher>/<level>/scale"
        self.keys = [f"{t}/{level}{suffix}" for t, dims in self.manifest["level_dims"].items()
                     for level in range(len(dims)) for suffix in ("", "/scale")[: 2 if self.dtype == "int8" else 1]]  # fmt: skip
        # per-file digests, only to name what changed: {name: digest prefix}; a list in file order before 2026-11-27
        self._content: dict[str, str] | list[str] | None = self.manifest.pop("content", None)
        self._layouts: dict[str, tuple] = {}  # shard name -> what `_layout` returns
        # shard name -> the file's signature (`_signature`) when its sha256 was checked: every read compares
        self._verified: dict[str, tuple[int, ...]] = {}
        # the pin-memory thread and the training thread may both read; reentrant: `_layout` holds it while
        # `_check_unchanged` may take it again to hash a shard anew
        self._lock = threading.RLock()
        self.token = token or uuid.uuid4().hex
        with _OPEN_LOCK:
            _OPEN[self.token] = self

    def __reduce__(self):
        """Pickled as (token, root) and the shards already verified (see `_OPEN`): a worker started by spawn,
        which gets a copy, does not hash them again."""
        return _reopen, (self.token, str(self.root), dict(self._verified))

    def check(self, expected_identity: dict, digests: list[tuple[str, str]] | None = None) -> None:
        """Refuse a cache built for other teachers or data (its sample count, ids and content included), naming
        every field that differs, and with `digests` (the dataset's `content_digests()`) the files that changed."""
        built = as_now(self.manifest["identity"])  # (options written out at their defaults by an older sak)
        if built != expected_identity:
            differences = _diff(built, expected_identity)
            differences += self._changed_files(built["data"], expected_identity.get("data", {}), digests)
            raise CacheError(f"stale cache {self.root}: " + "; ".join(differences)
                             + f"; {REBUILD.format(root=self.root)}")  # fmt: skip

    def _changed_files(self, built: dict, expected: dict, digests: list[tuple[str, str]] | None) -> list[str]:
        """Where the data's content differs from the build's, file by file: those whose digests changed, and
        those added or gone since. Only when the content digest differs (the same files under another folder
        are the same content), and the tasks whose labels are digested are the same (else their label files
        would be listed as gone or new). A cache built before 2026-11-27 recorded the digests without their names, in
        file order: paired by position only when the sample ids are unchanged (a file renamed, added or
        removed shifts every file after it)."""
        if digests is None or self._content is None or built.get("content_sha256") == expected.get("content_sha256"):
            return []
        if built.get("tasks") != expected.get("tasks"):  # other label files are digested: said by data.tasks
            return []
        now = {name: d[:CONTENT_PREFIX] for name, d in digests}
        before = self._content
        if isinstance(before, list):
            if len(before) != len(digests) or built.get("ids_sha256") != expected.get("ids_sha256"):
                return []
            before = dict(zip(now, before, strict=True))
        # a file's name is its absolute path since 2026-11-29 (`file_digests`); a build before kept the path as
        # data.root wrote it: a relative one that exists here is taken as the file it names (other names, such as
        # a package's images, are not paths)
        before = {_absolute(name): d for name, d in before.items()}
        found = (
            (f"of {len(now)} file(s) changed since the build", [n for n in now if n in before and before[n] != now[n]]),
            ("file(s) not in the build", [n for n in now if n not in before]),
            ("file(s) of the build gone", [n for n in before if n not in now]),
        )
        return [f"{len(names)} {what}: " + ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                for what, names in found if names]  # fmt: skip

    def verify_all(self, threads: int | None = None, part: tuple[int, int] = (0, 1), share=None) -> None:
        """Check every shard's sha256 now, once, `threads` shards at a time (`sha256_files`; default: one per
        usable CPU, at most 16): DataLoader workers are rebuilt every epoch and would otherwise hash each shard
        again in every worker. On N processes, `part` = (i, N) hashes every N-th shard from the i-th, and `share` (a
        gather of Python lists over the processes, e.g. Accelerate's `gather_object`) pools what each found,
        so that the cache is read once, not N times, and every process refuses a bad shard alike. Without
        `share`, the other processes' shards stay unchecked here, to be hashed when first read."""
        names = [name for name in self.manifest["shards"] if name not in self._verified]
        problems, signatures = self._problems(names[part[0] :: part[1]], threads)
        if share is not None:
            problems = share(problems)  # every process takes part, whatever it found
            # the other processes' shards count as checked here only if this process sees the files they hashed:
            # the same size, mtime and ctime (st_dev, and st_ino on some file systems, differ between clients).
            # One rewritten after they hashed it, before this stat, is left to be hashed when it is first read.
            hashed = {name: tuple(seen) for name, *seen in share([(n, *s[2:]) for n, s in signatures.items()])}
            for name in (n for n in names if n not in signatures and n in hashed):
                path = self._present(name)
                now = _signature(path.stat()) if path is not None else None
                if now is not None and now[2:] == hashed[name]:
                    signatures[name] = now
        if problems:
            raise CacheError(f"cache {self.root}: " + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
        self._verified.update(signatures)

    def _problems(self, names: list[str], threads: int | None = None) -> tuple[list[str], dict[str, tuple]]:
        """What is wrong with these shards ("shard X is missing" / "is corrupt ..."), without raising, and the
        signatures of those found intact: the same before and after their bytes were hashed."""
        problems, present = [], []
        for name in names:
            path = self._present(name)
            if path is None:
                problems.append(f"shard {name} is missing")
            else:
                present.append((name, path, _signature(path.stat())))
        digests = sha256_files([path for _, path, _ in present], threads)
        signatures = {}
        for (name, path, before), digest in zip(present, digests, strict=True):
            if digest != self.manifest["shards"][name]:
                problems.append(f"shard {name} is corrupt (sha256 differs from the manifest)")
            elif _signature(path.stat()) != before:
                problems.append(f"shard {name} changed while it was being checked")
            else:
                signatures[name] = before
        return problems, signatures

    def _verify(self, names: list[str]) -> None:
        problems, signatures = self._problems(names)
        if problems:
            raise CacheError(f"cache {self.root}: " + "; ".join(problems))
        self._verified.update(signatures)

    def _present(self, name: str) -> Path | None:
        """The shard's file, if the manifest lists it and it is there."""
        path = self.root / f"{name}.safetensors"
        return path if name in self.manifest["shards"] and path.is_file() else None

    def _layout(
        self, view: int, shard: int
    ) -> tuple[Path, dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]], tuple]:
        """A shard's file; per key, (offset of its first row, bytes per row, dtype, row shape), from the
        safetensors header (8 bytes of little-endian length, then JSON naming each tensor's dtype, shape and
        byte range: tensors are stored C-contiguous); and the file's signature when its sha256 was checked,
        which every read compares (`_signature`): a shard changed or replaced since (a cache rebuilt at its path
        during the run) is an error, not unchecked bytes. Read here rather than through safetensors, which has no
        call that reads rows into a buffer the caller gives (page-locked memory); its memory maps, kept open for
        a run, would turn a shard cut short under the run into a SIGBUS that kills the training process."""
        name = shard_name(view, shard)
        with self._lock:
            if name not in self._layouts:
                if name not in self._verified:
                    self._verify([name])
                path = self._present(name)
                if path is None:  # (verified earlier, deleted since)
                    raise CacheError(f"cache {self.root}: shard {name} is missing")
                signature = self._verified[name]
                with open(path, "rb") as f:
                    self._check_unchanged(f, name, signature)
                    try:
                        start = 8 + int.from_bytes(f.read(8), "little")
                        header = json.loads(f.read(start - 8))
                    except ValueError as exc:  # (its bytes passed the sha256 check: a cache built wrong)
                        raise CacheError(f"cache {self.root}: shard {name} has no readable header ({exc}); "
                                         f"{REBUILD.format(root=self.root)}") from exc  # fmt: skip
                rows = min(self.shard_size, self.samples - shard * self.shard_size)
                shapes = self.manifest.get("shapes", {})
                layout = {}
                for key in self.keys:
                    tid, level = key.split("/")[:2]
                    if key.endswith("/scale"):
                        want = [rows, self.manifest["level_dims"][tid][int(level)]]
                    else:
                        want = [rows, *shapes[tid][int(level)]] if tid in shapes else None
                    info = header.get(key)
                    if (not isinstance(info, dict) or info.get("dtype") not in _STORED
                            or not info.get("shape") or info["shape"][0] != rows
                            or (want is not None and info["shape"] != want)):  # fmt: skip
                        raise CacheError(f"cache {self.root}: shard {name} holds no {key!r} of shape {want or rows} "
                                         f"(its header: {info}); {REBUILD.format(root=self.root)}")  # fmt: skip
                    begin, end = info["data_offsets"]
                    layout[key] = (
                        start + begin,
                        (end - begin) // rows,
                        _STORED[info["dtype"]],
                        tuple(info["shape"][1:]),
                    )
                self._layouts[name] = (path, layout, signature)
            return self._layouts[name]

    def _check_unchanged(self, f, name: str, signature: tuple) -> None:
        """Refuse a shard whose file is no longer the one whose sha256 was checked. Where only its change time
        moved (a chmod, a hard link, an extended attribute, or a copy in place that set the old modification
        time back, as `cp -p` does), its bytes are hashed again, once: the same bytes read on."""
        now = _signature(os.fstat(f.fileno()))
        if now == signature:
            return
        if now[:4] == signature[:4]:
            with self._lock:
                if self._verified.get(name) == now:  # (hashed again already, by another thread's read)
                    return
                path = self.root / f"{name}.safetensors"
                if sha256_files([path])[0] == self.manifest["shards"][name] and _signature(path.stat()) == now:
                    self._verified[name] = now
                    if name in self._layouts:
                        self._layouts[name] = (*self._layouts[name][:2], now)
                    return
            raise CacheError(f"cache {self.root}: shard {name} changed since its sha256 was checked (its bytes "
                             "differ now: copied over during the run?); start the run again to check it anew")  # fmt: skip
        raise CacheError(f"cache {self.root}: shard {name} changed since its sha256 was checked (rebuilt or "
                         "replaced during the run?); start the run again to check it anew")  # fmt: skip

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= int(index) < self.samples:
            raise CacheError(f"cache {self.root}: sample index {index} is out of range: the cache holds "
                             f"{self.samples} samples (built for another dataset?); {REBUILD.format(root=self.root)}")  # fmt: skip
        return divmod(int(index), self.shard_size)

    def rows(self, index: int, epoch: int) -> dict[str, Tensor]:
        """Sample `index`'s cached maps for the view epoch `epoch` trains on, in their stored dtype:
        "<teacher>/<level>" (C, h, w) fp16 or int8, and for int8 "<teacher>/<level>/scale" (C,) float32."""
        return {key: value[0] for key, value in self.gather([index], epoch).items()}

    def gather(self, indices: list[int], epoch: int, pin: bool = False, threads: int = 1,
               out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:  # fmt: skip
        """The `rows` of samples `indices`, stacked per key: one copy, read from the shard files straight into
        new tensors (page-locked with `pin`; in shared memory inside a DataLoader worker, as `default_collate`
        makes them, so that the batch crosses to the training process without another copy) or into `out`.
        `threads` read samples in parallel (the reads release the GIL)."""
        view = epoch % self.views
        located = [self._locate(i) for i in indices]
        if not located:
            raise ValueError("FeatureCache.gather: no sample indices given")
        layouts = {shard: self._layout(view, shard) for shard in dict.fromkeys(s for s, _ in located)}
        _, first, _ = next(iter(layouts.values()))
        if out is None:
            shared = torch.utils.data.get_worker_info() is not None and not pin
            out = {
                key: _empty((len(indices), *shape), dtype, pin, shared) for key, (_, _, dtype, shape) in first.items()
            }

        def read(j: int) -> None:
            shard, row = located[j]
            path, layout, signature = layouts[shard]
            name = shard_name(view, shard)
            try:
                with open(path, "rb", buffering=0) as f:  # one file object per read: no shared file position
                    self._check_unchanged(f, name, signature)
                    for key, (offset, size, _, _) in layout.items():
                        f.seek(offset + row * size)
                        if _read_into(f, memoryview(out[key][j].numpy()).cast("B")) != size:
                            raise CacheError(f"cache {self.root}: shard {name} is shorter than its header says (cut "
                                             f"short since it was checked?); {REBUILD.format(root=self.root)}")  # fmt: skip
            except OSError as exc:
                raise CacheError(f"cache {self.root}: reading shard {name} failed: {exc}") from exc

        if threads > 1 and len(indices) > 1:
            with ThreadPoolExecutor(min(threads, len(indices)), thread_name_prefix="sak-cache") as pool:
                list(pool.map(read, range(len(indices))))
        else:
            for j in range(len(indices)):
                read(j)
        return out

    def targets(self, rows, device: torch.device | str = "cpu") -> dict[str, TeacherOutput]:
        """A batch's maps -> float32 teacher outputs on `device`. `rows`: the batch's `CachedRows` (read here,
        unless the loader's pin-memory thread has read them already) or what `gather` returns. The stored dtype
        crosses to the device as it is (half, or a quarter, of the float32 bytes) and is widened / dequantised
        there."""
        if isinstance(rows, CachedRows):  # (a loader that neither pinned nor read them)
            rows = rows.read()
        device = torch.device(device)
        result = {}
        for tid, dims in self.manifest["level_dims"].items():
            levels = []
            for level in range(len(dims)):
                key = f"{tid}/{level}"
                x = rows[key].to(device, non_blocking=True).float()
                if self.dtype == "int8":
                    x = x * rows[f"{key}/scale"].to(device, non_blocking=True).float()[:, :, None, None]
                levels.append(x)
            result[tid] = TeacherOutput(tuple(levels))
        return result

    def lookup(self, indices: list[int], epoch: int, device: torch.device | str = "cpu") -> dict[str, TeacherOutput]:
        """`targets` of samples `indices` (read into page-locked memory for a CUDA device)."""
        return self.targets(self.gather(indices, epoch, pin=torch.device(device).type == "cuda"), device)

    def level_dims(self) -> dict[str, tuple[int, ...]]:
        return {t: tuple(d) for t, d in self.manifest["level_dims"].items()}


class CachedRows:
    """A batch's cached maps before they are read: which cache, samples and epoch. The training loader's
    collate (`IndexedDataset.collate`) makes one per batch. A loader that pins its batches (on a GPU machine)
    hands it on as the batch's "cached": DataLoader workers then read none of the maps, only this small
    object crosses to the training process, and there the DataLoader's pin-memory step calls `pin_memory`,
    which reads the rows straight into page-locked memory (`FeatureCache.gather`, `pin_threads()` threads)
    while the training step runs (with workers; without them the loader pins in its own next()). A loader
    that does not pin reads them in its collate (in the worker, or in the loader's own next() without
    workers), so training on the CPU never waits for them inside a step.
    Before, a worker collated each sample's rows into shared memory and the pin-memory thread copied the
    batch again with one thread: three host copies of 505 MB a batch at SAK's stage-1 scale
    (benchmarks/results/cache_loader_cpu.md)."""

    def __init__(self, cache: FeatureCache, indices: list[int], epoch: int) -> None:
        self.cache, self.indices, self.epoch = cache, [int(i) for i in indices], int(epoch)

    def read(self, pin: bool = False) -> dict[str, Tensor]:
        """`FeatureCache.gather` of these samples: page-locked with `pin_threads()` threads, else with one (a
        worker's share) or, outside a worker, this process's intra-op thread count."""
        if pin:
            threads = pin_threads()
        else:
            threads = 1 if torch.utils.data.get_worker_info() is not None else torch.get_num_threads()
        return self.cache.gather(self.indices, self.epoch, pin=pin, threads=threads)

    def pin_memory(self, device=None) -> dict[str, Tensor]:
        """Called by the DataLoader's pin-memory step (torch.utils.data._utils.pin_memory)."""
        return self.read(pin=True)

    def __reduce__(self):
        """Pickled as the cache's (token, root), sample indices and epoch: a few hundred bytes a batch."""
        return _rows, (self.cache.token, str(self.cache.root), self.indices, self.epoch)

    def __repr__(self) -> str:
        return f"CachedRows({self.cache.root}, {len(self.indices)} samples, epoch {self.epoch})"


def _signature(stat: os.stat_result) -> tuple[int, int, int, int, int]:
    """What changes when a file is replaced, cut short or written: its device, inode, size, mtime and ctime (a
    copy in place that keeps the size and sets the old mtime back, as `cp -p` does, still changes the ctime,
    which no user call can set)."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _read_into(f, buffer: memoryview) -> int:
    """Fill `buffer` from `f`'s position (a read may return fewer bytes than asked); the bytes read, fewer at
    the end of the file. FileIO.readinto releases the GIL while it reads."""
    done = 0
    while done < len(buffer):
        got = f.readinto(buffer[done:])
        if not got:
            break
        done += got
    return done


def _empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool, shared: bool) -> Tensor:
    if shared:  # what default_collate does in a worker (PyTorch has no public call for it)
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)
    return torch.empty(shape, dtype=dtype, pin_memory=pin)
