"""FLOP counting shared by the benchmarks: torch.utils.flop_counter, plus PyTorch's CPU attention kernel.

flop_counter has formulas for the GPU's fused attention kernels (flash, memory-efficient, cuDNN) but not
for the CPU's (`_scaled_dot_product_flash_attention_for_cpu` and its backward), so on a CPU it counts no
attention FLOPs at all: a ViT's attention products, or SAM's, which at 1024 px are a fifth of its forward.
The CPU kernels compute the same products, so they get the same formulas.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# shape formulas, as flop_counter's custom_mapping takes them
CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts the CPU attention kernel."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
