"""CLIP's image tower as a teacher, from open_clip or timm (the text tower is never kept).

    teachers:
      - name: clip
        options: {source: open_clip, model: ViT-B-16}
        weights: laion2b_s34b_b88k    # an open_clip tag, hf-hub:org/repo, a local file or an open_clip directory
      - name: clip                    # what the official SAK code uses
        options: {source: timm, model: vit_base_patch16_clip_384}
        weights: hub                  # timm's default tag, another tag (openai_ft_in12k_in1k), or a local file

Levels: patch tokens of four evenly spaced blocks ending at the last ([2, 5, 8, 11] for ViT-B), the
final norm (`ln_post`) not applied, as (B, C, h, w). Summary: with open_clip, the projected image
embedding in CLIP's joint space (`encode_image` before L2 normalisation); with timm, the class token
after `ln_post` and before the projection (timm keeps CLIP's projection as the classifier `head`, and
its `*_ft_in1k` weights replaced it with an ImageNet classifier, so the head is dropped).

The same weights give the same levels from both libraries (open_clip / OpenAI checkpoints are converted
for timm by timm's own `checkpoint_filter_fn`). At an `image_size` other than the weights' own, both
resample the position embeddings once at load time, bicubic with antialiasing.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import pickle
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import timm
from einops import rearrange
from safetensors import SafetensorError
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..registry import TEACHERS
from .base import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    KEEP_RESAMPLING,
    Teacher,
    TeacherMeta,
    TeacherOutput,
    TeacherSpec,
    check_levels,
    count_params,
    normalize,
    to_float01,
)
from .weights import (
    WeightsError,
    build_error,
    check_timm_model,
    check_timm_tag,
    check_timm_tag_for_file,
    is_local,
    listing_digest,
    load_state_dict,
    load_strict,
    local_path,
    probe_build,
    refuse_other_patch_kernel,
    refuse_sha256_without_file,
    unpickling_reason,
    verify_sha256,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = {"open_clip": "ViT-B-16", "timm": "vit_base_patch16_clip_384"}
HUB_DEFAULT = ("hub", "default")


@dataclass
class Built:
    """A built image tower and what the teacher's metadata needs from its library."""

    net: nn.Module
    native_size: int
    digest: str | None  # sha256 of a local weights file
    weights: str
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    name: str | None = None  # what was loaded, where the `model` option plays no part (an open_clip directory)
    interpolation: str = "bicubic"  # the pretraining's eval resize (open_clip's CLIPA tags: bilinear)


@contextlib.contextmanager
def quiet_root_warnings():
    """open_clip warns "initialized randomly" through the root logger before we load a file ourselves."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


# ----------------------------------------------------------------------------------------------
# open_clip
# ----------------------------------------------------------------------------------------------
class OpenClipTower(nn.Module):
    """open_clip's `VisionTransformer`; block outputs are taken with forward hooks around the library's
    own forward, so pooling and projection are always open_clip's whatever its version."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.levels: tuple[int, ...] = ()
        self.patch_size = int(visual.conv1.kernel_size[0])
        self.depth = len(visual.transformer.resblocks)
        self.width = int(visual.conv1.out_channels)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        captured: dict[int, Tensor] = {}

        def keep(index: int, _module: nn.Module, _args: tuple, output: Tensor) -> None:
            captured[index] = output

        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        if (h, w) != tuple(self.visual.grid_size):
            raise ValueError(
                f"clip teacher (open_clip) was built for {self.visual.image_size} px input, got {tuple(x.shape[-2:])}; "
                "use teacher.preprocess or set image_size"
            )
        blocks = self.visual.transformer.resblocks
        handles = [blocks[i].register_forward_hook(partial(keep, i)) for i in self.levels]
        try:
            pooled = self.visual(x)
        finally:
            for handle in handles:
                handle.remove()
        if isinstance(pooled, tuple):  # towers built with output_tokens return (pooled, tokens)
            pooled = pooled[0]
        # open_clip >= 2.24 runs batch-first unless told otherwise; older releases (and batch_first=False) run
        # the blocks sequence-first
        batch_first = getattr(self.visual.transformer, "batch_first", False)
        maps = []
        for i in self.levels:
            tokens = captured[i] if batch_first else rearrange(captured[i], "n b c -> b n c")  # (B, 1 + h*w, C)
            maps.append(rearrange(tokens[:, 1:], "b (h w) c -> b c h w", h=h, w=w))
        return maps, pooled


def open_clip_tag_args(model: str, tag: str) -> dict:
    """create_model arguments for a pretrained tag; OpenAI's weights need QuickGELU, which open_clip only
    warns about when the model name lacks `-quickgelu`."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model)
    if tag not in tags:
        raise ValueError(
            f"clip teacher (open_clip): {tag!r} is neither a pretrained tag of {model!r} nor an existing file; "
            f"tags: {', '.join(tags) or 'none'}"
        )
    cfg = open_clip.get_pretrained_cfg(model, tag)
    return {"pretrained": tag, "force_quick_gelu": bool(cfg.get("quick_gelu", False))}


def hub_help(model: str, tag: str) -> str:
    """What to download for an open_clip tag offline, and how to name it: a bare weights file carries neither
    the tag's QuickGELU nor its mean / std (it gets the model config's, CLIP's for most), so the advice names
    the `-quickgelu` model, or a folder with the repository's open_clip_config.json, where the tag needs them."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = open_clip.get_pretrained_cfg(model, tag) or {}
    hub = cfg.get("hf_hub", "").rstrip("/")
    where = f" from https://huggingface.co/{hub}" if hub else ""
    bare = (open_clip.get_model_config(model) or {}).get("preprocess_cfg", {})
    tag_norm = tuple(cfg.get("mean", OPENAI_DATASET_MEAN)), tuple(cfg.get("std", OPENAI_DATASET_STD))
    file_norm = tuple(bare.get("mean", OPENAI_DATASET_MEAN)), tuple(bare.get("std", OPENAI_DATASET_STD))
    quick = bool(cfg.get("quick_gelu")) and not model.endswith("-quickgelu")  # (a -quickgelu model has it)
    named = f"{model}-quickgelu"
    if tag_norm != file_norm or (quick and named not in open_clip.list_models()):
        return (
            f"download the repository's files{where} (open_clip_config.json beside the weights) into a folder and "
            f"pass the folder as `weights`: a bare weights file would run with the model config's mean / std "
            f"{file_norm[0]} / {file_norm[1]}, not the tag's {tag_norm[0]} / {tag_norm[1]}"
            + (", and without QuickGELU" if quick else "")
        )
    if quick:
        return (
            f"download open_clip_pytorch_model.bin{where}, pass its path as `weights` and set `model: {named}` "
            "(the tag's weights need QuickGELU, which a file does not carry)"
        )
    return f"download open_clip_pytorch_model.bin{where} and pass its path as `weights` (keep `model: {model}`)"


def build_open_clip(model: str, spec: TeacherSpec, kwargs: dict) -> Built:
    """open_clip's VisionTransformer (the text tower is dropped), weights loaded, at the input size."""
    import open_clip
    from open_clip.model import resize_pos_embed

    what = f"clip teacher (open_clip {model})"
    refuse_sha256_without_file(spec.weights, spec.sha256, what)
    weights, name, args, file, digest = spec.weights, model, {}, None, None
    native_cfg = kwargs.get("vision_cfg")
    schema = weights is not None and (
        weights.startswith("hf-hub:") or is_local(weights) and Path(weights).expanduser().is_dir()
    )
    if not schema and model not in open_clip.list_models():
        close = difflib.get_close_matches(model, open_clip.list_models(), n=3)
        raise ValueError(
            f"{what}: unknown open_clip model {model!r}; close names: {close or 'none'} "
            "(open_clip.list_models() has them all)"
        )
    if weights is not None and is_local(weights) and Path(weights).expanduser().is_dir():
        name = f"local-dir:{Path(weights).expanduser()}"  # open_clip_config.json + weights, open_clip's layout
        if spec.sha256:
            raise WeightsError(f"{what}: sha256 needs a file; point `weights` at the checkpoint inside {weights!r}")
        digest = directory_digest(Path(weights).expanduser())
    elif weights is not None and is_local(weights):
        file = local_path(weights, what)
        digest = verify_sha256(file, spec.sha256, what)
    elif weights is not None and weights.startswith("hf-hub:"):
        name = weights
    elif weights is not None:
        if weights in HUB_DEFAULT:
            raise ValueError(
                f"{what}: open_clip has no default weights; name a tag: "
                f"{', '.join(open_clip.list_pretrained_tags_by_model(model))}"
            )
        args = open_clip_tag_args(model, weights)
    if spec.image_size is not None and "vision_cfg" in kwargs:  # kwargs replace the whole vision_cfg, force_* too
        kwargs["vision_cfg"] = {**kwargs["vision_cfg"], "image_size": spec.image_size}
    elif spec.image_size is not None:
        args["force_image_size"] = spec.image_size
    try:
        with quiet_root_warnings() if file is not None or weights is None else contextlib.nullcontext():
            clip = open_clip.create_model(name, **args, **kwargs)
    except (SafetensorError, pickle.UnpicklingError) as exc:  # a damaged or unsafe weights file (a local folder's)
        reason, hint = unpickling_reason(exc)
        raise WeightsError(f"{what}: open_clip cannot read the weights of {weights!r} ({type(exc).__name__}: "
                           f"{reason[:200]}): {hint}") from exc  # fmt: skip
    except (RuntimeError, OSError) as exc:  # hub errors (offline, not cached) surface as RuntimeError / OSError
        if weights is not None and is_local(weights):  # a local folder's (or file's): no hub was looked in
            first = " ".join(str(exc).split(". ")[0].split())[:300]
            raise WeightsError(f"{what}: open_clip cannot load the weights of {weights!r} ({type(exc).__name__}: "
                               f"{first}): a damaged file, or the weights of another model") from exc  # fmt: skip
        todo = hub_help(model, args["pretrained"]) if "pretrained" in args else "pass a local file or directory"
        text = None if schema else ((open_clip.get_model_config(model) or {}).get("text_cfg") or {})
        if text and text.get("hf_model_name"):  # (a local file did not help: "could not load None")
            todo = (f"have {text['hf_model_name']!r} in that cache: the text tower is that transformers model, "
                    "whose config open_clip reads from the hub to build it (sak drops the text tower after)")  # fmt: skip
        loading = repr(weights) if weights is not None else f"{model} with random weights"
        raise WeightsError(
            f"{what}: open_clip could not load {loading} (looked in the Hugging Face cache, HF_HOME / "
            f"~/.cache/huggingface): {type(exc).__name__}: {str(exc).rstrip('.')}. Offline, {todo}."
        ) from exc
    visual = clip.visual
    if not hasattr(getattr(visual, "transformer", None), "resblocks"):
        raise ValueError(
            f"{what}: the image tower is {type(visual).__name__}, not open_clip's VisionTransformer; "
            "for a timm image tower use `source: timm` with that timm model"
        )
    if file is not None:
        # float32 first, as the other teachers' files: OpenAI-derived files are fp16, whose position embedding
        # open_clip's antialiased bicubic resampling (another image_size) has no CPU kernel for
        state = {k.removeprefix("module."): v.float() if v.is_floating_point() else v
                 for k, v in load_state_dict(file, what).items()}  # fmt: skip
        if not any(k.startswith("visual.") for k in state):  # an image tower saved on its own
            state = {f"visual.{k}": v for k, v in state.items()}
        resize_pos_embed(state, clip)  # open_clip's own resampling to the built grid
        load_strict(visual, {k[7:]: v for k, v in state.items() if k.startswith("visual.")}, file, what)
    cfg = getattr(visual, "preprocess_cfg", None) or {}  # open_clip >= 2.24 records the tag's mean / std here
    mean, std = tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))
    return Built(visual, open_clip_native_size(name, native_cfg, visual, spec), digest, weights or "random", mean, std,
                 name=name if name.startswith("local-dir:") else None,
                 interpolation=cfg.get("interpolation", "bicubic"))  # fmt: skip


def directory_digest(folder: Path) -> str:
    """One sha256 over an open_clip directory's config and every weights file open_clip may pick from it (names
    and contents), so that the teacher's metadata, and a feature cache's identity, change with its weights."""
    return listing_digest([p for p in folder.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".bin", ".pth")
                                                                         or p.name == "open_clip_config.json")])  # fmt: skip


def open_clip_native_size(name: str, vision_cfg: dict | None, visual: nn.Module, spec: TeacherSpec) -> int:
    """The size the tower's configuration was made for (it was built at `spec.image_size` if that is set)."""
    import open_clip

    if spec.image_size is None:
        return int(visual.image_size[0])
    try:
        cfg = vision_cfg or (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
    except (OSError, RuntimeError):  # an hf-hub config that is not cached
        cfg = {}
    size = cfg.get("image_size", visual.image_size[0])
    return int(size if isinstance(size, int) else size[0])


# ----------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------
class TimmClipTower(nn.Module):
    """timm's `vit_*_clip_*` VisionTransformer through its `forward_intermediates`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.levels: tuple[int, ...] = ()
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.depth = len(model.blocks)
        self.width = int(model.embed_dim)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        final, maps = self.model.forward_intermediates(x, indices=list(self.levels), norm=False, output_fmt="NCHW")
        return maps, self.model.forward_head(final, pre_logits=True)  # class token after ln_post: (B, C)


def build_timm(model: str, spec: TeacherSpec, kwargs: dict) -> Built:
    """timm's VisionTransformer without its head, weights loaded, at the input size."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    what = f"clip teacher (timm {model})"
    refuse_sha256_without_file(spec.weights, spec.sha256, what)
    weights, local = spec.weights, spec.weights is not None and is_local(spec.weights)
    pretrained = weights is not None and not local
    name = f"{model.split('.')[0]}.{weights}" if pretrained and weights not in HUB_DEFAULT else model
    args = {"num_classes": 0, **kwargs, **({"dynamic_img_size": True} if spec.resize == "keep" else {})}
    if spec.image_size is not None:
        args["img_size"] = spec.image_size  # timm resamples pos_embed once while loading (checkpoint_filter_fn)
    try:
        check_timm_model(name, what)  # (timm's "Unknown model" came as a traceback)
    except ValueError as exc:
        import open_clip

        if model not in open_clip.list_models():
            raise
        raise ValueError(f"{exc}; {model!r} is an open_clip model: set `source: open_clip` (timm, the default "
                         f"source, names its CLIP towers like {DEFAULT_MODEL['timm']!r})") from None  # fmt: skip
    if local:
        check_timm_tag_for_file(name, what)
    if pretrained:
        check_timm_tag(name, what)
    try:
        net = timm.create_model(name, pretrained=pretrained, **args)
    except (TypeError, AssertionError) as exc:  # model_kwargs the model does not take (embed_dim / num_heads)
        raise build_error(exc, kwargs, what) from exc
    except (RuntimeError, OSError) as exc:
        if not pretrained:  # not a download: an unknown model or tag, which timm words clearly, or bad model_kwargs
            named = any(words in str(exc) for words in ("Unknown model", "Invalid pretrained tag"))
            if isinstance(exc, RuntimeError) and not named:
                raise build_error(exc, kwargs, what) from exc
            raise
        probe_build(lambda: timm.create_model(name, pretrained=False, **args), kwargs, what)
        raise WeightsError(
            f"{what}: could not create {name!r} with pretrained weights from the hub (looked in the Hugging Face "
            f"cache, HF_HOME / ~/.cache/huggingface): {type(exc).__name__}: {exc}. Offline, pass a local file "
            "instead: timm's model.safetensors or open_clip's open_clip_pytorch_model.bin."
        ) from exc
    native = int(kwargs.get("img_size") or net.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    digest = None
    if local:
        file = local_path(weights, what)
        digest = verify_sha256(file, spec.sha256, what)
        # open_clip's training checkpoints hold `module.`-prefixed keys (DDP), which timm's filter strips too
        raw = {k.removeprefix("module."): v for k, v in load_state_dict(file, what).items()}
        refuse_other_patch_kernel(raw, net, file, what, f"choose the `model` it was saved from, not {name!r}")
        state = checkpoint_filter_fn(raw, net)  # converts open_clip/OpenAI keys, resamples the position embeddings
        load_strict(net, {k: v for k, v in state.items() if not k.startswith("head.")}, file, what)
    cfg = net.pretrained_cfg  # the tag's (the default tag's for `hub` and for an untagged name)
    quick = any("quickgelu" in str(note).lower() for note in (cfg.get("notes") or ()))
    # (a local file under an untagged name may hold any of the model's tags: the default tag's note says nothing)
    named = pretrained or "." in name
    if weights is not None and named and quick and "quickgelu" not in name and "act_layer" not in kwargs:
        # timm builds the activation from the model name and only notes this in the tag; kept, as timm (and the
        # official SAK code through it) runs these weights, but said: it is not the network CLIP trained
        variant = name.split(".")[0].replace("_clip_", "_clip_quickgelu_", 1)
        fix = f"name the model {variant}" if timm.is_model(variant) else "set model_kwargs {act_layer: quick_gelu}"
        log.warning(
            "%s: the weights of %s were trained with QuickGELU, and timm's %s runs them with GELU; for CLIP's own "
            "network, %s", what, name, name.split(".")[0], fix,
        )  # fmt: skip
    mean, std = tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))
    return Built(net, native, digest, weights or "random", mean, std, interpolation=cfg.get("interpolation", "bicubic"))


BUILDERS = {"open_clip": (build_open_clip, OpenClipTower), "timm": (build_timm, TimmClipTower)}


@TEACHERS.register("clip")
class ClipTeacher(Teacher):
    """CLIP ViT image tower; see the module docstring for levels, summary and sources."""

    takes_resize_keep = True  # with source timm

    @dataclass
    class Options:
        source: Literal["open_clip", "timm"] = "timm"
        model: str | None = None  # open_clip name (ViT-B-16) or timm name (vit_base_patch16_clip_384)
        model_kwargs: dict = field(default_factory=dict)  # open_clip: create_model overrides (vision_cfg...); timm
        center_crop: bool = False  # preprocess as open_clip does: shortest side to size, centre crop

    def __init__(self, spec: TeacherSpec, options: Options) -> None:
        super().__init__(spec)
        self.options = options
        model = options.model or DEFAULT_MODEL[options.source]
        if spec.resize == "keep" and (options.source != "timm" or options.center_crop):
            raise ValueError(
                f"clip teacher ({model}): resize 'keep' feeds the image at its own size, through timm's model, "
                "which takes any size: it needs source timm"
                + (" and no center_crop" if options.center_crop else f", not {options.source}")
            )
        build, tower_type = BUILDERS[options.source]
        built = build(model, spec, dict(options.model_kwargs))
        self.tower = tower_type(built.net)
        levels = self.tower.levels = check_levels(spec.levels, self.tower.depth, f"clip teacher ({model})")
        summary = "joint-space image embedding" if options.source == "open_clip" else "class token before projection"
        self.meta = TeacherMeta(
            name=built.name or model,
            source=options.source,
            architecture=type(built.net).__name__,
            embed_dim=self.tower.width,
            patch_size=self.tower.patch_size,
            native_size=built.native_size,
            mean=built.mean,
            std=built.std,
            levels=levels,
            resize="keep" if spec.resize == "keep" else "square",
            weights=built.weights,
            sha256=built.digest,
            num_params=count_params(built.net),
            extra={
                "summary": summary,
                "center_crop": options.center_crop,
                **({"interpolation": built.interpolation} if built.interpolation != "bicubic" else {}),
                **({"pos_embed_resampling": KEEP_RESAMPLING} if spec.resize == "keep" else {}),
            },
        )

    def preprocess(self, images: Tensor) -> Tensor:
        """Loader batch (uint8 or float [0, 1], any size) -> (B, 3, S, S) normalised input.

        Default: bicubic resize (bilinear where the pretraining's eval transform is, e.g. open_clip's CLIPA tags,
        `meta.extra["interpolation"]`) of the whole image to S x S, so the teacher sees every pixel the student
        and the task targets see. `center_crop`: open_clip's eval transform, shortest side to S (bicubic)
        and a centre crop. Both clamp to [0, 1] after resampling, as PIL's 8-bit bicubic does. With resize
        "keep": (B, 3, H', W'), the image cut to a multiple of the patch size (the official SAK code's input).
        """
        if self.meta.resize == "keep":  # the base class cuts the image to the patch and normalises it
            return super().preprocess(images)
        size = self.input_size
        target = [size] if self.options.center_crop else [size, size]
        mode = InterpolationMode(self.meta.extra.get("interpolation", "bicubic"))
        x = TF.resize(to_float01(images), target, interpolation=mode, antialias=True)
        # out of place: resize and crop hand back the caller's own tensor (or a view of it) when they change nothing
        x = TF.center_crop(x, [size, size]).clamp(0.0, 1.0)
        if self.spec.normalization == "imagenet":
            return normalize(x, IMAGENET_MEAN, IMAGENET_STD)
        return normalize(x, self.meta.mean, self.meta.std)

    def check_image_size(self, image_hw: tuple[int, int]) -> None:
        if self.options.center_crop and image_hw[0] != image_hw[1]:
            raise ValueError(
                f"teacher {self.meta.name}: center_crop keeps the centre square of the {image_hw[0]} x {image_hw[1]} "
                "images, and its maps would be laid over the whole image, each token against the wrong place; "
                "center_crop is for square images (stage 1): set it to false for this data"
            )

    def forward(self, x: Tensor) -> TeacherOutput:
        """(B, 3, S, S) preprocessed images -> levels (B, C, S/p, S/p) and the summary (B, D)."""
        levels, summary = self.tower(x)
        return TeacherOutput(levels=tuple(levels), summary=summary)
