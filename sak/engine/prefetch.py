"""Copy the next training batch to the GPU while the current step runs (`data.prefetch_to_device`).

Accelerate copies a batch to the device when the loop asks for it, on the step's CUDA stream, so the
copy runs between two steps' kernels. That is negligible for images (7 MB per batch of 16 at 384 px) but
not for a teacher-feature cache: 505 MB of cached maps per batch at SAK's ViT-B stage-1 scale, about
20 ms over PCIe against a 64 ms step. `DevicePrefetcher` reads one batch ahead instead: before it hands
out batch k it has issued batch k+1's copy on a side stream, so that the copy overlaps step k.

Hand-written because neither PyTorch's DataLoader nor Accelerate copies ahead on a side stream; the
pattern is the usual one (per-batch events, `record_stream`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from accelerate.utils import send_to_device


def _tensors(data) -> Iterator[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        yield data
    elif isinstance(data, dict):
        for value in data.values():
            yield from _tensors(value)
    elif isinstance(data, (list, tuple)):
        for value in data:
            yield from _tensors(value)


def prefetch_enabled(setting: bool | str, device: torch.device | str, cached: bool, grad_accum: int) -> bool:
    """Whether training reads ahead (`data.prefetch_to_device`). `auto` turns it on where it was measured to
    pay: training from a teacher-feature cache on a CUDA device, without gradient accumulation (on an H200,
    a compiled stage-1 step from the fp16 cache went from 0.98x to 1.69x the online run's images/s;
    benchmarks/results/throughput_gpu_h200.md). Online batches are images, small enough that the copy
    between steps costs little, so `auto` leaves them to Accelerate."""
    if setting == "auto":
        return cached and torch.device(device).type == "cuda" and grad_accum == 1
    return bool(setting)


class DevicePrefetcher:
    """Iterate host batches (page-locked by the loader on a CUDA machine) as device batches, one ahead.

    On CUDA each batch's copy is issued on a side stream and followed by an event; when the batch is handed
    out the step's stream waits for that event only (not for the next batch's copy, already queued behind
    it), and every tensor is marked as used by the step's stream (`record_stream`), so that the caching
    allocator does not give its memory to a later copy while the step may still read it. On the CPU the
    batches pass through unchanged, with the same one-batch look-ahead, so that the CPU tests run the same
    iteration as a GPU.

    Reading ahead moves Accelerate's end-of-epoch flag one batch early, which matters to gradient
    accumulation only: the recipe check refuses `data.prefetch_to_device` with `optim.grad_accum` > 1.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _issue(self, batch):
        if self.stream is None:
            return send_to_device(batch, self.device), None
        with torch.cuda.stream(self.stream):
            moved = send_to_device(batch, self.device, non_blocking=True)
            return moved, self.stream.record_event()

    def _ready(self, moved, copied):
        if copied is not None:
            step_stream = torch.cuda.current_stream(self.device)
            step_stream.wait_event(copied)
            for t in _tensors(moved):
                t.record_stream(step_stream)
        return moved

    def __call__(self, batches: Iterable) -> Iterator:
        it = iter(batches)
        try:
            ahead = self._issue(next(it))
        except StopIteration:
            return
        for batch in it:
            current, ahead = ahead, self._issue(batch)
            yield self._ready(*current)
        yield self._ready(*ahead)
