"""Resolve and read teacher weights safely: safetensors, or torch.load(weights_only=True)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor

LOCAL_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


class WeightsError(RuntimeError):
    """Weights that cannot be found, read or trusted; the message says what was looked for."""


def is_local(weights: str | None) -> bool:
    """True when `weights` names something on disk (a file or a directory) rather than a hub tag."""
    if weights is None:
        return False
    return (
        os.path.exists(os.path.expanduser(weights))
        or weights.endswith(LOCAL_SUFFIXES)
        or "/" in weights
        and (weights.startswith((".", "/", "~")))
    )


def local_path(weights: str, what: str) -> Path:
    path = Path(os.path.expanduser(weights))
    if not path.exists():
        raise WeightsError(
            f"{what}: weights file {str(path)!r} does not exist. Pass an existing local file "
            f"(.safetensors, or .pth/.pt/.bin saved with torch.save) or a hub tag."
        )
    return path


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str | None, what: str) -> str:
    """Digest of `path`; raises if `expected` is given and differs."""
    actual = sha256_of(path)
    if expected is not None and actual != expected.lower().removeprefix("sha256:"):
        raise WeightsError(f"{what}: sha256 of {str(path)!r} is {actual}, but the recipe expects {expected}")
    return actual


def load_state_dict(path: str | os.PathLike, what: str = "weights") -> dict[str, Tensor]:
    """Read a state dict from .safetensors or a torch file (weights_only=True, never pickle code).

    Checkpoints that wrap the state dict under "model" / "state_dict" / "module" are unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors carry no path; add it
        raise WeightsError(f"{what}: cannot read {str(path)!r} with torch.load(weights_only=True): {exc}") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{what}: {str(path)!r} does not hold a state dict of tensors")
    return obj
