"""Training engine on Hugging Face Accelerate."""

from .trainer import NonFiniteLossError, make_accelerator, train

__all__ = ["NonFiniteLossError", "make_accelerator", "train"]
