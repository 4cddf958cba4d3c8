"""FreeSel (Xie et al., NeurIPS 2023): pick the images worth labelling from one forward pass of a frozen
general-purpose model, with no training.

Per image, the "semantic patterns" are:
1. the patch features of one block (default: the penultimate, after the model's final norm, as FreeSel
   reads DINO's intermediate layers), for a teacher built on a timm `VisionTransformer` wherever it keeps
   it (`vit_of`); other teachers give their deepest returned level. Tokens that cover only the padding of a
   letterboxing teacher (SAM) are left out of everything below (`valid_tokens`);
2. filtered to the patches that carry the top `keep` share (default 50%) of the last block's CLS
   attention (head-averaged CLS -> patch attention, renormalised over patches): the smallest set of
   highest-attention patches whose attention sums to at least `keep`. For teachers without that
   attention (not a timm ViT with a CLS token), the same rule runs on the patches' L2 norms;
3. clustered with k-means (k = 5, k-means++ seeding, Lloyd iterations); an image with fewer kept
   patches than k keeps all of them.
`selection.py` then samples images over these pattern sets. `sak select` is the command (docs/selection.md).

The CLS attention of a timm `VisionTransformer` block is recomputed (`cls_attention`) from the block's own
`norm1`, `qkv`, `q_norm` / `k_norm` and `scale` on the block input, for the CLS query only (timm's fused
attention never materialises the attention matrix). `attention_unavailable` admits only a plain timm
`Block` with timm's `Attention`, where that recomputation is exact (tests compare it with the block's own).
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..teachers import Teacher
from ..teachers.base import image_tokens, letterbox_extent
from .selection import (
    ImageFeatures,
    SelectionError,
)

FilterMode = Literal["auto", "attention", "norm"]


@dataclass
class PatternOptions:
    """How semantic patterns are made (the `sak select` flags of the same names)."""

    block: int | None = None  # ViT block whose patches are used (negative = from the end); None = penultimate
    keep: float = 0.5  # share of the CLS-attention (or feature-norm) mass the kept patches carry
    k: int = 5  # k-means centres per image
    filter: FilterMode = "auto"  # attention where the teacher has it, else feature norms
    kmeans_iters: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise SelectionError(f"keep must be in (0, 1], got {self.keep}")
        if self.k < 1:
            raise SelectionError(f"k must be at least 1, got {self.k}")
        if self.filter not in ("auto", "attention", "norm"):
            raise SelectionError(f"filter must be auto, attention or norm, got {self.filter!r}")


# ---------------------------------------------------------------------------------------------------
# Patch filtering
# ---------------------------------------------------------------------------------------------------
def top_share_mask(weights: Tensor, share: float) -> Tensor:
    """(B, N) non-negative weights -> (B, N) bool: per row, the fewest largest entries whose sum reaches
    `share` of the row's total (the entry that crosses the threshold is kept; ties broken by position)."""
    w = weights.double() / weights.double().sum(1, keepdim=True).clamp_min(1e-300)
    ordered, order = w.sort(dim=1, descending=True, stable=True)
    before = ordered.cumsum(1) - ordered  # mass of the larger entries before each one
    return torch.zeros_like(order, dtype=torch.bool).scatter_(1, order, before < share)


def vit_of(teacher: nn.Module):
    """The timm `VisionTransformer` inside a teacher, wherever the teacher keeps it (`timm` and
    `dinov2_imgfocus`: `.model`; `dinov2`, timm or meta source: `.backbone.model`; `clip`, timm source:
    `.tower.model`), else None (CNNs, SAM's `VisionTransformerSAM`, the transformers and open_clip sources).

    Searched among the submodules rather than read from one attribute name, so that a teacher wrapping its
    ViT is not silently given the feature-norm filter on its last level instead of FreeSel's method.

    Raises:
        SelectionError: the teacher holds more than one (whose patches and attention to use would be a guess).
    """
    from timm.models.vision_transformer import VisionTransformer

    found = [(name, m) for name, m in teacher.named_modules() if isinstance(m, VisionTransformer)]
    if len(found) > 1:
        names = ", ".join(name or "(the teacher itself)" for name, _ in found)
        raise SelectionError(
            f"teacher {type(teacher).__name__} holds {len(found)} timm VisionTransformers ({names}); "
            "FreeSel needs exactly one to read patches and CLS attention from"
        )
    return found[0][1] if found else None


def valid_tokens(teacher: Teacher, sizes: list[tuple[int, int]] | None, grid: tuple[int, int]) -> Tensor | None:
    """(B, h*w) bool over a (h, w) token grid: True where a token covers the image, False where it covers only
    the padding of a letterboxing teacher (resize "longest_pad", SAM: longest side to the input size, aspect
    kept, zeros right and below). None when every token is image (the other teachers squash the whole image
    into their input) or when the original sizes (H, W) are not known.

    A token is image when its centre lies in the resized image, and there is at least one per axis: on a
    16 x 64 image at 64 px with 8 px tokens that keeps the top 2 of 8 token rows.
    """
    if teacher.meta.resize != "longest_pad" or sizes is None:
        return None
    side, (gh, gw) = teacher.input_size, grid
    mask = torch.zeros(len(sizes), gh, gw, dtype=torch.bool)
    for row, (h, w) in enumerate(sizes):
        th, tw = image_tokens(grid, side, letterbox_extent((h, w), side))  # (as Teacher.image_region crops)
        mask[row, :th, :tw] = True
    return mask.flatten(1)


def attention_unavailable(model) -> str | None:
    """Why the last block's CLS attention cannot be recomputed exactly, or None when it can."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    if model is None:
        return "the teacher is not a timm VisionTransformer"
    if getattr(model, "cls_token", None) is None:
        return "the model has no CLS token"
    if len(model.blocks) < 2:
        return "the model has a single block (no block input to read)"
    last = model.blocks[-1]
    if type(last) is not Block or type(last.attn) is not Attention:
        kinds = f"{type(last).__name__} / {type(getattr(last, 'attn', None)).__name__}"
        return f"its last block is {kinds}, not timm's Block / Attention"
    return None


def cls_attention(block: nn.Module, tokens: Tensor, num_prefix: int) -> Tensor:
    """Head-averaged attention of the CLS token (token 0) to the patch tokens in a timm ViT `Block`.

    Args:
        block: a timm `vision_transformer.Block` (pre-norm: attention runs on `norm1(tokens)`).
        tokens: the block's input (B, T, C), prefix tokens first.
        num_prefix: CLS plus register tokens; the patches are tokens[:, num_prefix:].

    Returns:
        (B, N) attention over the N patches, renormalised to sum to 1 per image.
    """
    attn = block.attn
    x = block.norm1(tokens)
    qkv = rearrange(attn.qkv(x), "b t (three h d) -> three b h t d", three=3, h=attn.num_heads)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # (B, heads, 1, T): the CLS query only
    weights = logits.float().softmax(-1)[:, :, 0, num_prefix:].mean(1)  # (B, N)
    return weights / weights.sum(1, keepdim=True)


def vit_patch_tokens(model, x: Tensor, block: int, with_attention: bool) -> tuple[Tensor, Tensor | None]:
    """Patch features of `block` after the final norm (B, N, C), and the last block's CLS attention (B, N)."""
    depth = len(model.blocks)
    if not -depth <= block < depth:
        raise SelectionError(f"block {block} does not exist: the model has {depth} blocks (0..{depth - 1})")
    block %= depth
    wanted = sorted({block, depth - 2} if with_attention else {block})
    outputs = model.forward_intermediates(  # stop_early: the blocks after the last wanted one are not run
        x, indices=wanted, norm=False, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True,
        stop_early=True,
    )  # fmt: skip
    by_index = dict(zip(wanted, outputs, strict=True))  # index -> (patches (B, N, C), prefix (B, P, C))
    # (a ViT with no prefix token, SigLIP's or one with class_token false, gives its patches alone, not a pair;
    # it has no CLS attention either, and falls back to the norm filter before `with_attention` is asked for)
    out = by_index[block]
    feats = model.norm(out[0] if isinstance(out, tuple) else out)
    if not with_attention:
        return feats, None
    patches, prefix = by_index[depth - 2]  # the input of the last block
    tokens = torch.cat([prefix, patches], dim=1)
    return feats, cls_attention(model.blocks[-1], tokens, prefix.shape[1])


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def patch_tokens(
    teacher: Teacher,
    x: Tensor,
    options: PatternOptions,
    dtype: torch.dtype | None = None,
    sizes: list[tuple[int, int]] | None = None,
) -> tuple[Tensor, Tensor, str, Tensor]:
    """Preprocessed input (B, 3, H, W) -> patch features (B, N, C), filter weights (B, N), the filter used,
    and which tokens are image (B, N) bool (see `valid_tokens`; `sizes` are the images' (H, W) before
    preprocessing). Padding tokens have weight 0.

    ViT teachers give `options.block` (default: the penultimate) after the final norm; other teachers give
    their deepest returned level (`build_teacher` makes it the level `--block` names)."""
    model = vit_of(teacher)
    why_not = attention_unavailable(model)
    if options.filter == "attention" and why_not is not None:
        raise SelectionError(f"filter 'attention' is impossible for teacher {teacher.meta.name}: {why_not}; use norm")
    use_attention = options.filter != "norm" and why_not is None
    with torch.inference_mode(), _autocast(x.device, dtype):
        if model is None:
            level = teacher(x).levels[-1]
            grid = tuple(level.shape[-2:])
            feats, attn = rearrange(level, "b c h w -> b (h w) c"), None
        else:
            # the ViT is run on the teacher's own preprocessed input, as the teacher's forward runs it
            # (forward_intermediates), so its token layout (class + register prefix, patch grid) is the teacher's
            grid = tuple(model.patch_embed.dynamic_feat_size(tuple(x.shape[-2:])))
            feats, attn = vit_patch_tokens(model, x, -2 if options.block is None else options.block, use_attention)
    feats = feats.float().clone()  # a normal tensor again, out of inference mode
    weights = feats.norm(dim=-1) if attn is None else attn.float().clone()
    valid = valid_tokens(teacher, sizes, grid)
    if valid is None:
        valid = torch.ones(weights.shape, dtype=torch.bool)
    valid = valid.to(weights.device)
    return feats, weights * valid, "norm" if attn is None else "attention", valid


# ---------------------------------------------------------------------------------------------------
# Per-image k-means
# ---------------------------------------------------------------------------------------------------
def _inverse_cdf(prob: Tensor, u: Tensor) -> Tensor:
    """Row-wise draw from unnormalised (b, N) weights with uniforms u (b,) -> (b,) indices (zero weights never)."""
    cdf = prob.cumsum(1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=prob.shape[1] - 1)


def _kmeanspp(x: Tensor, mask: Tensor, k: int, uniforms: Tensor) -> Tensor:
    """k-means++ seeding per row: x (b, N, C), mask (b, N), uniforms (b, k) -> centres (b, k, C)."""
    rows = torch.arange(len(x), device=x.device)
    valid = mask.double()
    chosen = _inverse_cdf(valid, uniforms[:, 0])
    centres = [x[rows, chosen]]  # (b, C) each
    nearest = torch.full(mask.shape, torch.inf, dtype=torch.float64, device=x.device)
    for j in range(1, k):
        nearest = torch.minimum(nearest, (x - centres[-1][:, None]).square().sum(-1).double())
        weight = nearest * valid
        weight = torch.where(weight.sum(1, keepdim=True) > 0, weight, valid)  # all points coincide: uniform
        centres.append(x[rows, _inverse_cdf(weight, uniforms[:, j])])
    return torch.stack(centres, 1)


def batched_kmeans(x: Tensor, mask: Tensor, k: int, uniforms: Tensor, iters: int = 100) -> list[Tensor]:
    """k-means on each row's kept points: x (B, N, C), mask (B, N) -> B tensors (min(k, kept), C).

    Hand-written rather than a library call: it runs batched on the teacher's device inside the feature
    pass (scikit-learn would be a per-image CPU loop, 2-14 ms each). Seeding draws only from `uniforms`
    (B, k), one row per image, so an image's centres do not depend on its batch or process.
    An empty cluster keeps its previous centre.
    """
    counts = mask.sum(1).tolist()
    out: list[Tensor | None] = [x[b][mask[b]] if counts[b] <= k else None for b in range(len(x))]
    big = [b for b in range(len(x)) if counts[b] > k]
    if not big:
        return out  # type: ignore[return-value]
    xb, mb = x[big].float(), mask[big]
    centres = _kmeanspp(xb, mb, k, uniforms[big].to(x.device, torch.float64))
    previous = None
    for _ in range(iters):
        assign = torch.cdist(xb, centres).argmin(-1).masked_fill_(~mb, -1)  # (b, N); -1 = filtered out
        if previous is not None and torch.equal(assign, previous):
            break
        onehot = F.one_hot(assign.clamp_min(0), k).to(xb.dtype) * mb[..., None]  # (b, N, k)
        size = onehot.sum(1)[..., None]  # (b, k, 1)
        centres = torch.where(size > 0, onehot.transpose(1, 2) @ xb / size.clamp_min(1), centres)
        previous = assign
    for row, b in enumerate(big):
        out[b] = centres[row]
    return out  # type: ignore[return-value]


def image_uniforms(keys: list[int], k: int, seed: int) -> Tensor:
    """(B, k) uniforms for k-means seeding, a function of (seed, the image's key) only."""
    return torch.from_numpy(np.stack([np.random.default_rng([seed, i]).random(k) for i in keys]))


def content_key(image: Tensor) -> int:
    """A key of an image's pixels (uint8 (3, H, W)), to seed its k-means: two copies of one image get the same
    patterns wherever they sit in the pool, so a copy of a selected image is at distance ~0 (seeded by its pool
    position, it got other local optima, as far from the selected one as unrelated images)."""
    digest = hashlib.blake2b(f"{tuple(image.shape)} {image.dtype}".encode(), digest_size=8)
    digest.update(image.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little")


def semantic_patterns(
    teacher: Teacher,
    x: Tensor,
    keys: list[int],
    options: PatternOptions,
    dtype: torch.dtype | None = None,
    sizes: list[tuple[int, int]] | None = None,
    ids: list[str] | None = None,
) -> tuple[list[Tensor], Tensor, str]:
    """Preprocessed images (B, 3, H, W) with k-means keys `keys` (`content_key` of each image) -> per-image
    patterns (m_i <= k, C), global features (B, C) and the filter used ("attention" or "norm"). `sizes`: the
    images' (H, W) before preprocessing, so that letterbox padding is left out of both (see `valid_tokens`);
    `ids`: the images' ids, for errors.

    Raises:
        SelectionError: the teacher gave a non-finite feature or filter weight for an image (one NaN would
            spread to every distance, turning the sampling into a uniform draw).
    """
    feats, weights, used, valid = patch_tokens(teacher, x, options, dtype, sizes)
    finite = feats.isfinite().flatten(1).all(1) & weights.isfinite().flatten(1).all(1)  # (B,)
    if not bool(finite.all()):
        bad = [(ids or keys)[i] for i in (~finite).nonzero().flatten().tolist()]
        hint = f" computed in {str(dtype).removeprefix('torch.')}: try --dtype fp32" if dtype is not None else ""
        raise SelectionError(f"teacher {teacher.meta.name} gave non-finite features (nan or inf) for image(s) "
                             f"{bad[:5]}{hint}")  # fmt: skip
    keep = top_share_mask(weights, options.keep) & valid  # & valid: with keep=1 zero weights would pass too
    uniforms = image_uniforms(keys, options.k, options.seed)
    patterns = batched_kmeans(feats, keep, options.k, uniforms, options.kmeans_iters)
    global_features = (feats * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)  # mean over image tokens
    return [p.float().cpu() for p in patterns], global_features.float().cpu(), used


# ---------------------------------------------------------------------------------------------------
# The feature pass (1..N processes) and the pool
# ---------------------------------------------------------------------------------------------------
def collate_images(samples: list[dict]) -> dict:
    """Keep images as a list: a folder pool mixes sizes; `preprocess_batch` brings them to one."""
    return {key: [s[key] for s in samples] for key in ("image", "id")}


def preprocess_batch(teacher: Teacher, images: list[Tensor], device: torch.device) -> Tensor:
    """uint8 (3, H_i, W_i) images -> the teacher's input (B, 3, S, S)."""
    if all(im.shape == images[0].shape for im in images):
        return teacher.preprocess(torch.stack(images).to(device))
    parts = [teacher.preprocess(im[None].to(device)) for im in images]
    if any(p.shape != parts[0].shape for p in parts):
        raise SelectionError(
            f"teacher {teacher.meta.name} keeps image sizes ({teacher.meta.resize} resize), so images of "
            "different sizes cannot be batched: use --batch-size 1"
        )
    return torch.cat(parts)


def extract_features(
    teacher: Teacher,
    pool: torch.utils.data.Dataset,
    options: PatternOptions,
    batch_size: int = 16,
    num_workers: int = 0,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[list[ImageFeatures], str]:
    """Semantic patterns and global features of every image of `pool`, ordered by index, and the filter
    used. Each Accelerate process takes a contiguous shard; the results are gathered in every process."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    state = PartialState(cpu=not torch.cuda.is_available())
    teacher = teacher.to(state.device)
    rows, used = [], set()
    with state.split_between_processes(list(range(len(pool)))) as mine:
        subset = torch.utils.data.Subset(pool, mine)
        loader = torch.utils.data.DataLoader(subset, batch_size, num_workers=num_workers, collate_fn=collate_images)
        bar = tqdm(loader, desc="select: features", unit="batch", disable=not (progress and state.is_main_process))
        for batch in bar:
            indices = mine[len(rows) : len(rows) + len(batch["id"])]  # positions in the pool
            x = preprocess_batch(teacher, batch["image"], state.device)
            sizes = [tuple(im.shape[-2:]) for im in batch["image"]]
            ids = [str(i) for i in batch["id"]]
            keys = [content_key(im) for im in batch["image"]]
            patterns, global_features, how = semantic_patterns(teacher, x, keys, options, dtype, sizes, ids)
            used.add(how)
            for i, image_id, p, g in zip(indices, ids, patterns, global_features, strict=True):
                rows.append(ImageFeatures(i, image_id, p, g))
    if state.num_processes > 1:
        rows, used = gather_object(rows), set(gather_object(sorted(used)))
    rows.sort(key=lambda r: r.index)
    if [r.index for r in rows] != list(range(len(pool))):
        raise RuntimeError(f"feature pass returned {len(rows)} images for a pool of {len(pool)}")
    return rows, "+".join(sorted(used))


def build_teacher(name: str, weights: str | None, options: dict, image_size: int | None, block: int | None) -> Teacher:
    """`create_teacher` for selection: for a non-ViT teacher, `block` names the returned level."""
    from ..teachers import TeacherSpec, create_teacher

    levels = [block] if block is not None and block >= 0 else None
    spec = TeacherSpec(weights=weights, image_size=image_size, levels=levels)
    try:
        teacher = create_teacher(name, weights, spec=spec, **options)
    except ValueError as exc:  # (the teacher's words name its `levels`, which a user gave as --block)
        if levels is None or "levels" not in str(exc):
            raise
        raise SelectionError(f"--block {block} does not fit teacher {name}: {exc}") from None
    if vit_of(teacher) is None and block is not None and block < 0:
        raise SelectionError(
            f"teacher {name} is not a ViT (it holds no timm VisionTransformer): --block names one of its levels "
            f"(its default levels are {list(teacher.meta.levels)}), not {block}"
        )
    return teacher


def main(argv: list[str] | None = None) -> int:
    """`python -m sak.methods.freesel ...` (and `accelerate launch -m sak.methods.freesel ...`): `sak select`,
    through the `sak` command's own parser and error reporting (one line and status 2 for bad input)."""
    from ..cli import main as sak_main

    return sak_main(["select", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
