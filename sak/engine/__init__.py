"""Training engine on Hugging Face Accelerate."""

from .launch import make_accelerator
from .trainer import NonFiniteLossError, train

__all__ = ["NonFiniteLossError", "make_accelerator", "train"]
