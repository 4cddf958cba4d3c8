"""Distillation losses (registry `LOSSES`) and the task losses they are combined with."""

from .distill import DistillLoss, MSEDistill, SAKDistill, TokenCosineDistill, match_size

__all__ = ["DistillLoss", "MSEDistill", "SAKDistill", "TokenCosineDistill", "match_size"]
