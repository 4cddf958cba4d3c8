"""Learning-rate schedules as multipliers of the base lr, for `torch.optim.lr_scheduler.LambdaLR`."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_lambda(name: str, total: int, warmup: int, base_lr: float, min_lr: float = 0.0, power: float = 0.9) -> Callable:
    """Linear warm-up from 0 over `warmup` steps, then: cosine to `min_lr`; poly (1 - t)^power; constant."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        if name == "cosine":
            floor = min_lr / base_lr
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        if name == "poly":
            return (1 - t) ** power
        if name == "constant":
            return 1.0
        raise ValueError(f"schedule.name: unknown schedule {name!r}; expected cosine, poly or constant")

    return factor
