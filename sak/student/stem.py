"""Teacher-Agnostic Stem (TAS): a timm ViT whose blocks are run one by one so that the adapter paths
can read every block's output."""

from __future__ import annotations

import timm
import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..teachers.base import IMAGENET_MEAN, IMAGENET_STD
from ..teachers.weights import (
    WeightsError,
    build_error,
    check_timm_model,
    check_timm_tag,
    check_timm_tag_for_file,
    is_timm_file,
    load_state_dict,
    local_path,
)


def even_levels(depth: int, count: int = 4) -> list[int]:
    """`count` block indices `depth // count` apart, ending at the last one: 12 -> [2, 5, 8, 11], 24 ->
    [5, 11, 17, 23]; evenly spaced when `count` divides `depth` (6 -> [2, 3, 4, 5], 10 -> [3, 5, 7, 9])."""
    count = min(count, depth)
    step = depth // count
    return [depth - 1 - step * (count - 1 - i) for i in range(count)]


def student_levels(levels: list[int] | None, depth: int) -> list[int]:
    """`student.levels` checked against a stem of `depth` blocks (default: `even_levels`): distinct block
    indices in increasing order, as the adapter paths hand out their levels in block order."""
    levels = list(levels) if levels is not None else even_levels(depth)
    if any(not 0 <= i < depth for i in levels):
        raise ValueError(f"student.levels {levels} must index the stem's {depth} blocks (0..{depth - 1})")
    if levels != sorted(set(levels)):
        raise ValueError(
            f"student.levels {levels}: give distinct blocks in increasing order, e.g. {sorted(set(levels))}"
        )
    return levels


class TeacherAgnosticStem(nn.Module):
    """Args:
    model: timm ViT name (patch 16 in SAK: vit_{small,base,large}_patch16_384).
    image_size: the input size the ViT is built for, a side or (H, W) (`student.input_size`, else
        data.image_size square): its position-embedding grid; with `dynamic_img_size` timm resamples it to
        other inputs, without, it refuses them.
    pretrained: None (random), a timm pretrained tag (e.g. "augreg_in21k_ft_in1k"), or a local file.
    normalization: "pretrained" (the mean / std the weights were trained with, timm's pretrained_cfg: 0.5 / 0.5
        for AugReg) or "imagenet" (ImageNet's, as the official SAK code feeds every model; with it the
        reference's padding, 0 after normalisation, is the ImageNet mean colour sak pads with).
    """

    def __init__(
        self,
        model: str,
        image_size: int | tuple[int, int],
        pretrained: str | None = None,
        normalization: str = "pretrained",
        **model_kwargs,
    ) -> None:
        super().__init__()
        check_timm_model(model, "student.model")
        file = local_path(pretrained, "student.pretrained") if is_timm_file(pretrained) else None  # (before building)
        hub = pretrained is not None and file is None
        name = f"{model.split('.')[0]}.{pretrained}" if hub else model
        if hub:  # (timm's RuntimeError for an unknown tag would read as a download problem below)
            check_timm_tag(name, f"student.pretrained {pretrained!r}")
        elif pretrained is not None and normalization == "pretrained":  # a file's mean / std: its name's tag's
            check_timm_tag_for_file(model, f"student.pretrained {pretrained!r} (student.normalization: pretrained)")
        try:
            self.vit = timm.create_model(name, pretrained=hub, num_classes=0, img_size=image_size, **model_kwargs)
        except (TypeError, AssertionError) as exc:  # a keyword the model does not take, or a value it refuses
            where = "student.input_size" if isinstance(image_size, tuple) else "data.image_size"
            raise build_error(exc, model_kwargs, f"student {model} (img_size={image_size} from {where})") from exc
        except (RuntimeError, OSError) as exc:  # hub errors (offline, not cached) are OSErrors
            if not hub:  # not a download: bad model_kwargs, which timm words clearly
                raise
            raise WeightsError(
                f"student.pretrained {pretrained!r}: could not create {name!r} with pretrained weights from the hub "
                f"(looked in the Hugging Face cache, HF_HOME / ~/.cache/huggingface): {type(exc).__name__}: {exc}. "
                "Offline, pass a local file instead: `student.pretrained: /path/to/model.safetensors` (or .pth)."
            ) from exc
        if pretrained is not None and not hub:
            from timm.models.vision_transformer import checkpoint_filter_fn

            state = load_state_dict(file, "student.pretrained")
            kernel, want = state.get("patch_embed.proj.weight"), self.vit.patch_embed.proj.weight.shape
            if kernel is not None and tuple(kernel.shape) != tuple(want):  # (timm's filter would resample it)
                raise WeightsError(
                    f"student.pretrained {pretrained!r}: its patch embedding is {tuple(kernel.shape)}, the student "
                    f"{model}'s {tuple(want)} (another patch size or width); choose the student.model it was saved from"
                )
            state = checkpoint_filter_fn(state, self.vit)  # resamples position embeddings to image_size
            result = self.vit.load_state_dict(
                {k: v for k, v in state.items() if not k.startswith("head.")}, strict=False
            )
            # the classifier and final norms are dropped below; anything else missing means the file is not a
            # plain timm ViT state dict (a `module.` prefix from DDP, a sak checkpoint's `stem.vit.`, another model)
            missing = [k for k in result.missing_keys if not k.startswith(("head.", "norm.", "fc_norm."))]
            if missing or result.unexpected_keys:
                raise ValueError(
                    f"student.pretrained {pretrained!r}: not the state dict of a timm {model}: "
                    f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                    f"unexpected {result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''} "
                    "(a sak run's weights start a student through checkpoint.init_from)"
                )
        # Levels are taken before the final norm (as SAK) and there is no classifier: drop both, and the
        # attention-pooling head of `global_pool="map"` ViTs (SigLIP), so that every parameter takes part in
        # the loss (DDP requires it).
        self.vit.norm, self.vit.fc_norm, self.vit.head = nn.Identity(), nn.Identity(), nn.Identity()
        if getattr(self.vit, "attn_pool", None) is not None:
            self.vit.attn_pool = None
        self.dim = self.vit.embed_dim
        self.grad_checkpointing = False  # student.grad_checkpointing: blocks recomputed in backward
        self.depth = len(self.vit.blocks)
        self.patch_size = self.vit.patch_embed.patch_size[0]
        self.num_prefix_tokens = self.vit.num_prefix_tokens
        cfg = self.vit.pretrained_cfg
        if normalization == "imagenet":
            self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        elif normalization == "pretrained":
            self.mean, self.std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
        else:
            raise ValueError(f"student.normalization {normalization!r}: expected pretrained or imagenet")

    def embed(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> tokens (B, prefix + h*w, D) after position embedding."""
        v = self.vit
        x = v.patch_embed(x)
        x = v._pos_embed(x)
        x = v.patch_drop(x)
        return v.norm_pre(x)

    def run(self, x: Tensor) -> tuple[Tensor, list[Tensor], tuple[int, int]]:
        """Normalised images (B, 3, H, W) -> the embedded tokens, every block's output tokens
        (B, prefix + h*w, D) and the patch grid (h, w)."""
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:  # the patch embedding would drop the remainder silently
            raise ValueError(
                f"images of {h} x {w} px: the student's patch size {self.patch_size} must divide both "
                "(data.image_size, the dataset's crop_size / eval_size)"
            )
        grid = (h // self.patch_size, w // self.patch_size)
        embedded = self.embed(x)
        outs, tokens = [], embedded
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.vit.blocks:
            # non-reentrant checkpointing: works with DDP, torch.compile and inputs that need no gradient, and
            # replays the block's random state (drop path) in the recomputation
            tokens = checkpoint(block, tokens, use_reentrant=False) if recompute else block(tokens)
            outs.append(tokens)
        return embedded, outs, grid

    @property
    def blocks(self) -> nn.Sequential:
        return self.vit.blocks

    def add_lora(self, config: dict) -> None:
        """Inject LoRA layers (peft) into the ViT; only they stay trainable in the stem."""
        from peft import LoraConfig, inject_adapter_in_model

        try:
            inject_adapter_in_model(LoraConfig(**config), self.vit)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"student.lora {config}: {exc}") from exc

    def truncate(self, depth: int) -> None:
        """Keep only the first `depth` blocks (blocks after the last output level would get no gradient)."""
        self.vit.blocks = self.vit.blocks[:depth]
        self.depth = depth

    def to_map(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, prefix + h*w, C) -> (B, C, h, w), dropping the prefix (CLS / register) tokens."""
        return rearrange(tokens[:, self.num_prefix_tokens :], "b (h w) c -> b c h w", h=grid[0], w=grid[1])
