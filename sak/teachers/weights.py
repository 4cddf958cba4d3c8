"""Resolve and read teacher weights safely: safetensors, or torch.load(weights_only=True)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..digest import sha256_of

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar")  # (.tar: .pth.tar, MoCo's and DeiT's)


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
        or weights.count("/") >= 2  # a hub id is org/name: ckpts/dino/model.npz is a path, there or not
        and not weights.startswith("hf-hub:")
    )


def is_timm_file(weights: str | None) -> bool:
    """`is_local`, or any name with a '/': a timm pretrained tag (lvd142m, augreg_in21k) has none, so that
    ckpts/model.npz, missing, is said to be missing rather than passed to timm as a tag."""
    return weights is not None and (is_local(weights) or "/" in weights)


# keyword arguments of the model libraries' create_model calls that load weights by their own route (timm:
# pretrained / checkpoint_path / pretrained_cfg(_overlay); open_clip: pretrained and its tower paths and flags,
# weights_only: false, ...). Given in model_kwargs they would bypass `weights` (its sha256 check and the identity
# that the feature cache and checkpoints record), and open_clip's `weights_only: false` would unpickle an
# arbitrary file: a recipe could run code without naming a plug-in module. Values that load nothing (false, null,
# weights_only: true) are allowed.
# open_clip's tower configs (model_kwargs vision_cfg / text_cfg, read nested) load a whole pretrained timm or
# transformers model with timm_model_pretrained / hf_model_pretrained, and with hf_model_name unless
# hf_model_pretrained is set false (`loader_keys`).
LOADER_KWARGS = frozenset({
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "weights_only", "load_weights",
    "pretrained_image", "pretrained_text", "pretrained_image_path", "pretrained_text_path", "pretrained_hf",
    "require_pretrained", "timm_model_pretrained", "hf_model_pretrained",
})  # fmt: skip


def loader_keys(kwargs: dict, prefix: str = "") -> list[str]:
    """The keys of `kwargs`, nested mappings included (as "text_cfg.hf_model_name"), that ask a model library to
    load weights by its own route."""
    found = []
    for key, value in kwargs.items():
        if isinstance(value, dict):
            found += loader_keys(value, f"{prefix}{key}.")
        elif key in LOADER_KWARGS and (value is not True if key == "weights_only" else bool(value)):
            found.append(f"{prefix}{key}")
        elif key == "hf_model_name" and value and kwargs.get("hf_model_pretrained", True) is not False:
            found.append(f"{prefix}{key} (with hf_model_pretrained not false)")
    return found


def refuse_loader_kwargs(model_kwargs, where: str, instead: str) -> None:
    """`where`'s model_kwargs must not ask a model library to load weights (LOADER_KWARGS set to load: true, a
    path or a config; `weights_only` to anything but true; open_clip's tower configs' own loaders, nested);
    `instead` says what to set (teachers[].weights, student.pretrained)."""
    if not isinstance(model_kwargs, dict):
        return
    found = sorted(loader_keys(model_kwargs))
    if found:
        raise ValueError(
            f"{where}: {', '.join(found)} load weights by the model library's own route, which sak does not check "
            f"(sha256, the identity checkpoints and caches record) and which may unpickle a file; give the "
            f"weights as {instead}"
        )


def refuse_sha256_without_file(weights: str | None, sha256: str | None, what: str) -> None:
    """A pinned sha256 can only be checked against a local file: with a hub tag (or random weights) it would
    be silently ignored, so that is an error, the same for every teacher."""
    if sha256 and not is_local(weights):
        found = "no `weights` (random)" if weights is None else f"{weights!r} is a hub tag"
        raise WeightsError(f"{what}: sha256 needs a local file; {found}. Pass the downloaded file, or drop sha256")


LOCAL_OR_TAG = "an existing local file (.safetensors, or .pth/.pt/.bin saved with torch.save) or a hub tag"


def local_path(weights: str, what: str, accepts: str = LOCAL_OR_TAG, directory: bool = False) -> Path:
    """`weights` as an existing path (a file, or with `directory` also a folder); else an error saying what
    `what` accepts instead."""
    path = Path(os.path.expanduser(weights))
    if not path.exists():
        where = "" if path.is_absolute() else f" (from {Path.cwd()})"
        raise WeightsError(f"{what}: weights file {str(path)!r} does not exist{where}. Pass {accepts}.")
    if path.is_dir() and not directory:  # (a raw IsADirectoryError from hashing or reading it, before)
        raise WeightsError(f"{what}: weights {weights!r} is a directory; pass {accepts}{bare_name_hint(weights)}")
    return path


def bare_name_hint(weights: str) -> str:
    """For a name without a path separator that `is_local` took for a path because it exists here (a folder
    `hub/` or `sa1b/` in the working directory): say so, as the user likely meant the hub tag."""
    if "/" in weights or os.sep in weights:
        return ""
    return (". A bare name that exists in the working directory is read as a path, not as a hub tag: run from "
            "another directory, or give the file's path")  # fmt: skip


def verify_sha256(path: str | os.PathLike, expected: str | None, what: str) -> str:
    """Digest of `path`; raises if `expected` is given and differs."""
    actual = sha256_of(path)
    if expected is not None and actual != expected.lower().removeprefix("sha256:"):
        raise WeightsError(f"{what}: sha256 of {str(path)!r} is {actual}, but the recipe expects {expected}")
    return actual


def listing_digest(files: list[Path]) -> str:
    """One sha256 over several files' names and contents (a directory's config and weights shards), so that a
    teacher's metadata, and a feature cache's identity, change with any of them."""
    import hashlib

    from ..digest import sha256_files

    files = sorted(files)
    listing = "".join(f"{p.name} {d}\n" for p, d in zip(files, sha256_files(files), strict=True))
    return hashlib.sha256(listing.encode()).hexdigest()


def unpickling_reason(exc: Exception) -> tuple[str, str]:
    """torch.load(weights_only=True)'s error as (its reason, what it means). torch's words for a file it cannot
    unpickle are a page advising weights_only=False (which can run the file's code): only its reason is kept, e.g.
    "operand 105" (torch 2.14 gives it after "WeightsUnpickler error:", or, for a blocked module, after the
    advice alone)."""
    if type(exc).__name__ == "SafetensorError":  # (the folder loaders pass safetensors' errors here too)
        return " ".join(str(exc).split()), "a damaged safetensors file (cut short, or not safetensors)"
    text = str(exc).split("Check the documentation")[0]
    text = text.split("WeightsUnpickler error:")[-1] if "WeightsUnpickler error:" in text else text
    reason = " ".join(text.split("trusted source.")[-1].split())
    if "is blocked" in reason:  # a call that unpickling would run (os.system...): never a weights file's
        return (
            reason,
            "it would run code to load, which a weights file never needs; do not load it with weights_only=False",
        )
    if "nsupported global" in reason or "GLOBAL" in reason:  # a training checkpoint's config objects
        return reason, "it holds objects other than tensors; save its state dict alone (torch.save(model.state_dict()))"
    return reason, "not a file torch.save wrote, or a damaged one"


def without_ddp_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` without the `module.` that DistributedDataParallel puts before every key, when every key has it."""
    if state and all(k.startswith("module.") for k in state):
        return {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_state_dict(path: str | os.PathLike, what: str = "weights") -> dict[str, Tensor]:
    """Read a state dict from .safetensors or a torch file (weights_only=True, never pickle code).

    Checkpoints that wrap the state dict under "model" / "state_dict" / "module" are unwrapped, and the `module.`
    prefix of every key of a DistributedDataParallel model's state dict is dropped (clip's loaders alone did).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return without_ddp_prefix(load_file(str(path)))
        except Exception as exc:  # safetensors' header errors carry no path either
            raise WeightsError(f"{what}: cannot read {str(path)!r} as safetensors: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors carry no path; add it
        reason, hint = unpickling_reason(exc)
        raise WeightsError(
            f"{what}: cannot read {str(path)!r} with torch.load(weights_only=True) "
            f"({type(exc).__name__}: {reason[:200]}): {hint}"
        ) from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{what}: {str(path)!r} does not hold a state dict of tensors")
    return without_ddp_prefix(obj)


PATCH_KERNELS = (
    "patch_embed.proj.weight",
    "visual.conv1.weight",
    "conv1.weight",
    "visual.trunk.patch_embed.proj.weight",
)


def refuse_other_patch_kernel(state: dict[str, Tensor], net: nn.Module, file, what: str, hint: str) -> None:
    """timm's checkpoint_filter_fn resamples a patch kernel of another size to the model's without a word: a
    ViT-B/32 file (or a DINOv2-trained ViT-L/16, UNI's) would load into a /16 (/14) model as a network nobody
    trained. Only the position embeddings may be resampled: a kernel of another shape is a WeightsError naming
    both shapes (keys of timm, Meta, OpenAI CLIP and open_clip's timm towers)."""
    kernel = next((state[k] for k in PATCH_KERNELS if k in state), None)
    want = net.patch_embed.proj.weight.shape
    if kernel is not None and tuple(kernel.shape) != tuple(want):
        raise WeightsError(f"{what}: {str(file)!r} has a patch embedding of shape {tuple(kernel.shape)}, the model "
                           f"one of {tuple(want)} (another patch size or width): {hint}")  # fmt: skip


def load_strict(
    module: nn.Module,
    state: dict[str, Tensor],
    path: str | os.PathLike,
    what: str,
    check: str = "`model` / `size` / `model_kwargs`",
) -> None:
    """`load_state_dict(strict=True)` whose error names the file and the first offending keys; `check`: the
    options that size the model (a plug-in's own, such as `width`)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise WeightsError(
            f"{what}: {str(path)!r} does not fit the model ({len(missing)} missing keys, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}; {len(shapes)} shape mismatches, e.g. {shapes[:2]}). "
            f"Check {check} against the checkpoint."
        )
    module.load_state_dict(state, strict=True)


# -- converted-weights cache ----------------------------------------------------------------------
# Teachers whose weights come in a foreign format (ONNX, Keras HDF5) convert them once and keep the result
# as safetensors, with the file's own sha256 in a `.sha256` file beside it: the metadata says what the file
# was made from, the digest that its bytes are still what was written.
def cache_dir() -> Path:
    """Where converted weights are kept: $SAK_CACHE, else ~/.cache/sak."""
    return Path(os.environ.get("SAK_CACHE") or Path.home() / ".cache" / "sak").expanduser()


def read_cache(target: Path, expected: dict[str, str], what: str) -> dict[str, Tensor] | None:
    """The state dict cached in `target` if the file is intact (its sha256 matches the digest written beside
    it) and its metadata has the `expected` values (source digest, converter version); None, with a warning
    saying why, otherwise: the caller converts again and rewrites the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    sidecar = target.with_name(target.name + ".sha256")
    if not target.is_file():
        return None
    problem = None
    if not sidecar.is_file():
        problem = f"no digest beside it ({sidecar.name}): written by an older sak, or the write was interrupted"
    elif sidecar.read_text().strip() != sha256_of(target):
        problem = "its sha256 does not match the digest written beside it (damaged or edited)"
    else:
        with safe_open(str(target), framework="pt") as f:
            meta = f.metadata() or {}
        if any(meta.get(k) != v for k, v in expected.items()):
            made_from = ", ".join(f"{k}={meta.get(k)}" for k in expected)
            problem = f"it was made from another source ({made_from})"
    if problem:
        log.warning("%s: rebuilding cached weights %s: %s", what, target, problem)
        return None
    return load_file(str(target))


def write_cache(target: Path, state: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write the safetensors file and its own sha256 beside it, each atomically (temp file + rename)."""
    from ..files import save_safetensors

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".{os.getpid()}.partial")
    sidecar = target.with_name(target.name + ".sha256")
    tmp_sidecar = sidecar.with_name(sidecar.name + f".{os.getpid()}.partial")
    try:
        save_safetensors(state, tmp, metadata)
        tmp_sidecar.write_text(sha256_of(tmp) + "\n")
        os.replace(tmp, target)
        os.replace(tmp_sidecar, sidecar)
    finally:  # a failed write (full or read-only disk) leaves no partial files behind
        tmp.unlink(missing_ok=True)
        tmp_sidecar.unlink(missing_ok=True)


def check_timm_model(name: str, what: str) -> None:
    """A model name timm does not know (a typo) is a ValueError naming the closest names timm has; timm's own
    RuntimeError ("Unknown model") came as a traceback, or was reported as a failed download."""
    import difflib

    import timm
    from timm.models import parse_model_name

    if parse_model_name(name)[0] is not None:  # `hf-hub:` / `local-dir:`: timm reads the model from there
        return
    model = name.partition(".")[0]
    if not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=3, cutoff=0.75)
        raise ValueError(
            f"{what}: timm has no model {model!r}"
            + (f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())")
        )


def build_error(exc: Exception, kwargs: dict, what: str) -> ValueError:
    """timm's TypeError / AssertionError for model_kwargs the model does not take, as a ValueError naming them."""
    return ValueError(f"{what}: model_kwargs {kwargs} do not build the model: {type(exc).__name__}: {exc}")


def probe_build(create, kwargs: dict, what: str) -> None:
    """After a library failed to create a model with its hub weights: `create` it without them. If that fails
    too, the model_kwargs were at fault, not the download (timm builds the model before it fetches anything),
    and that is raised (`build_error`); otherwise the caller reports the download."""
    try:
        create()
    except (RuntimeError, AssertionError, TypeError) as exc:
        raise build_error(exc, kwargs, what) from exc


def check_timm_tag(name: str, what: str) -> None:
    """Before timm downloads `name` ("model.tag"): a tag timm does not know is a ValueError listing the model's
    tags (timm's RuntimeError would be reported as a failed download). A model timm does not know is left to
    timm, whose error names it."""
    import timm

    model, _, tag = name.partition(".")
    if tag and timm.is_model(model) and not timm.list_pretrained(name):
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{model}.*")]
        raise ValueError(
            f"{what}: {tag!r} is not a pretrained tag of timm's {model}; "
            + (f"its tags: {', '.join(tags)}" if tags else "timm knows no pretrained weights for it")
            + ", or a local file"
        )


def check_timm_tag_for_file(name: str, what: str) -> None:
    """A local file carries no mean / std; timm takes them from the model name's tag, or from its default tag
    when the name has none. A model's weights may differ (CLIP: OpenAI's and most open_clip ones use CLIP's
    constants, LAION's ViT-L/14 0.5; ViT-B/16: AugReg 0.5, DINO and MAE ImageNet's), so an untagged name is only
    accepted when every tag of the model agrees; otherwise the name must say which weights the file holds."""
    import timm
    from timm.models import get_pretrained_cfg

    if "." in name:
        return  # a tag: timm itself rejects an unknown one
    norms: dict[tuple, list[str]] = {}
    for tagged in timm.list_pretrained(f"{name}.*"):
        cfg = get_pretrained_cfg(tagged)
        norms.setdefault((tuple(cfg.mean), tuple(cfg.std)), []).append(tagged)
    if len(norms) > 1:
        choices = "; ".join(f"mean {mean} / std {std}: {', '.join(tags)}" for (mean, std), tags in norms.items())
        raise WeightsError(
            f"{what}: a local file with an untagged model name is ambiguous, as {name}'s tags were trained with "
            f"different mean / std ({choices}). Name the tag of the weights in `model`, e.g. `model: {tagged}`"
        )


def first_misfit(exc: RuntimeError, limit: int = 300) -> str:
    """The line of a `load_state_dict` RuntimeError that says what does not fit (its first line only says
    "Error(s) in loading state_dict for SAKStudent:"; one line follows per mismatched tensor)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    first = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
    return first if len(first) <= limit else first[: limit - 3] + "..."
