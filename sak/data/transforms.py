"""SAK's data augmentation for dense multi-task training, evaluation padding, and the crops of
unlabelled images for stage 1.

Dense samples travel as `Sample` dicts of numpy arrays in (H, W) / (H, W, C) layout: "image" (uint8 or
float32 RGB) plus any of the targets named in `FILL`. The stage-2 pipeline follows the public SAK code
(which follows mmseg): random scale 0.5-2.0 (bilinear image, nearest targets, depth divided by the
scale), random crop whose largest class covers less than `cat_max_ratio` of the crop (up to 10 redraws),
horizontal flip (the x component of normals changes sign), photometric distortion, centred padding
(targets with their ignore value), and parts set to all-ignore when no part pixel is left. Every random
draw comes from the numpy `Generator` the caller passes (the dataset's `sample_rng(index)`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .base import IGNORE_INDEX

Sample = dict[str, np.ndarray]

# What padding writes into each target (its "ignore" value in the sample contract of base.py).
FILL: dict[str, float] = {
    "semseg": IGNORE_INDEX,
    "parts": IGNORE_INDEX,
    "saliency": IGNORE_INDEX,
    "edges": IGNORE_INDEX,
    "normals": 0.0,
    "depth": 0.0,
}
BUILT_IN_TARGETS = frozenset(FILL)


def add_target(name: str, fill: float) -> None:
    """Let the dense transforms carry a plug-in task's target `name`: an (H, W) or (H, W, C) array of the image's
    size, resized nearest, cropped and mirrored as the built-in labels (its values unchanged) and padded with
    `fill` (its ignore value); `to_tensors` gives it as (1, H, W) or (C, H, W), float32 or int64. Call it where
    the plug-in task or dataset is defined (a module under `imports:`); calling it again with the same fill is
    harmless."""
    if name == "image":
        raise ValueError("add_target('image', ...): 'image' is the sample's picture, not a target")
    same = name in FILL and (FILL[name] == fill or math.isnan(FILL[name]) and math.isnan(fill))
    if name in BUILT_IN_TARGETS or name in FILL and not same:
        raise ValueError(f"add_target({name!r}, {fill}): {name!r} is already a target with fill {FILL[name]}")
    FILL[name] = fill


# The reference pads the *normalised* image with 0, i.e. with the ImageNet mean colour in pixel space.
IMAGENET_MEAN_UINT8 = (124, 116, 104)
BLACK = (0, 0, 0)


@dataclass
class DenseAugment:
    """Parameters of the stage-2 training pipeline (defaults: the public SAK code)."""

    crop_size: tuple[int, int]  # (H, W) of every training sample
    scale_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75  # 1.0 switches the class-ratio check off
    cat_max_tries: int = 10
    flip: bool = True
    photometric: bool = True
    image_fill: tuple[int, int, int] = IMAGENET_MEAN_UINT8


def _check_keys(sample: Sample) -> None:
    """Known keys, and numpy arrays of the layout the transforms index: image (H, W, 3), normals (H, W, 3), the
    other targets (H, W), each target of the image's size (a label at another scale was cropped at the image's
    coordinates, misaligned without a word)."""
    unknown = [k for k in sample if k != "image" and k not in FILL]
    if unknown:
        raise KeyError(f"unknown target(s) {unknown} in a dense sample; known: {['image', *FILL]} (a plug-in task's "
                       "target is made known with sak.data.transforms.add_target(name, fill))")  # fmt: skip
    image = sample["image"]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"a dense sample's image is {image.shape}; the transforms take (H, W, 3) arrays (channels last)"
        )
    for key, value in sample.items():
        want = (*image.shape[:2], 3) if key == "normals" else image.shape[:2]
        if key not in BUILT_IN_TARGETS and value.ndim == 3:  # (a plug-in's target may have channels)
            want = (*want, value.shape[2])
        if key != "image" and tuple(value.shape) != want:
            raise ValueError(
                f"a dense sample's {key} is {tuple(value.shape)} and its image {tuple(image.shape)}: each target must "
                f"be {want}, the image's height and width{' with 3 channels' if key == 'normals' else ''}"
            )


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------
def resize_sample(sample: Sample, size: tuple[int, int], depth_scale: float | None = None) -> Sample:
    """Image bilinear (no antialias, half-pixel centres, as cv2.INTER_LINEAR); targets nearest (as
    cv2.INTER_NEAREST: source index floor(dst * (1 / (out / in)))), so labels stay labels and normals stay unit
    vectors. Depth is divided by `depth_scale` (default: the height ratio), as the public SAK code does:
    an image enlarged k times looks as if seen from k times closer."""
    _check_keys(sample)
    h, w = sample["image"].shape[:2]
    nh, nw = size
    # float64: torch's CPU bilinear kernel rounds differently with the number of threads (a loader worker has one),
    # which in float32 moved a few pixels by a grey level between processes; in float64 the differences are ~1e-13
    image = torch.from_numpy(np.ascontiguousarray(sample["image"], dtype=np.float64))
    image = F.interpolate(image.permute(2, 0, 1)[None], size=(nh, nw), mode="bilinear", align_corners=False)
    out = {"image": image[0].permute(1, 2, 0).numpy()}
    # cv2's own arithmetic, 1 / (out / in) rather than in / out: they differ where the product should be a whole
    # number (one row or column in about 5% of sizes, e.g. w 698 -> 1348, column 674)
    rows = np.minimum(np.floor(np.arange(nh) * (1.0 / (nh / h))).astype(np.int64), h - 1)
    cols = np.minimum(np.floor(np.arange(nw) * (1.0 / (nw / w))).astype(np.int64), w - 1)
    for key, value in sample.items():
        if key == "image":
            continue
        out[key] = value[rows][:, cols]
        if key == "depth":
            out[key] = out[key] / (depth_scale or nh / h)
    return out


def random_scale(sample: Sample, rng: np.random.Generator, low: float, high: float) -> Sample:
    """Scale by a factor drawn uniformly from [low, high); sizes truncate as int(h * s)."""
    scale = float(rng.uniform(low, high)) if high > low else float(low)
    if scale == 1.0:
        return sample
    h, w = sample["image"].shape[:2]
    return resize_sample(sample, (max(1, int(h * scale)), max(1, int(w * scale))), depth_scale=scale)


def crop(sample: Sample, top: int, left: int, size: tuple[int, int]) -> Sample:
    """The window [top, top + H) x [left, left + W), clipped to the sample (smaller samples stay smaller)."""
    return {k: v[top : top + size[0], left : left + size[1]] for k, v in sample.items()}


def max_class_ratio(label: np.ndarray, ignore_index: int = IGNORE_INDEX) -> float:
    """Share of the most frequent class among non-ignored pixels (1.0 when fewer than two classes)."""
    counts = np.bincount(label.ravel().astype(np.int64))  # labels are small non-negative integers
    if ignore_index < len(counts):
        counts[ignore_index] = 0
    counts = counts[counts > 0]
    if len(counts) < 2:
        return 1.0
    return float(counts.max() / counts.sum())


def random_crop(
    sample: Sample, rng: np.random.Generator, size: tuple[int, int], cat_max_ratio: float = 1.0, tries: int = 10
) -> Sample:
    """A uniformly placed crop of `size` (offsets in [0, H - h]); with `cat_max_ratio` < 1 and a "semseg"
    target, up to `tries` crops are checked and the first whose largest class covers less than the ratio
    (with at least two classes) is kept; after `tries` failures one more crop is drawn and kept unchecked,
    exactly as mmseg's RandomCrop and the public SAK code."""
    h, w = sample["image"].shape[:2]

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, max(h - size[0], 0) + 1)), int(rng.integers(0, max(w - size[1], 0) + 1))

    top, left = draw()
    if cat_max_ratio < 1.0 and "semseg" in sample:
        for _ in range(tries):
            window = sample["semseg"][top : top + size[0], left : left + size[1]]
            if max_class_ratio(window) < cat_max_ratio:
                break
            top, left = draw()
    return crop(sample, top, left, size)


def hflip(sample: Sample) -> Sample:
    """Mirror left-right; surface normals point the other way along x."""
    out = {k: np.ascontiguousarray(v[:, ::-1]) for k, v in sample.items()}
    if "normals" in out:
        out["normals"][..., 0] *= -1
    return out


def pad_offsets(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of a (h, w) content centred in a (H, W) canvas, as the reference pads: delta // 2."""
    return max(target[0] - size[0], 0) // 2, max(target[1] - size[1], 0) // 2


def pad(sample: Sample, size: tuple[int, int], image_fill: tuple[int, int, int] = IMAGENET_MEAN_UINT8) -> Sample:
    """Centre the sample in a canvas of at least `size`, image filled with `image_fill`, targets with `FILL`."""
    _check_keys(sample)
    h, w = sample["image"].shape[:2]
    H, W = max(size[0], h), max(size[1], w)
    if (H, W) == (h, w):
        return sample
    top, left = pad_offsets((h, w), (H, W))
    out = {}
    for key, value in sample.items():
        fill = np.asarray(image_fill, dtype=value.dtype) if key == "image" else FILL[key]
        canvas = np.empty((H, W, *value.shape[2:]), dtype=value.dtype)
        canvas[...] = fill
        canvas[top : top + h, left : left + w] = value
        out[key] = canvas
    return out


def unpad(x: torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor | np.ndarray:
    """Crop a padded map (..., H, W) back to the original (h, w) that `pad` centred in it (the dataset's
    "size"); use it on predictions before scoring, as the reference evaluation does."""
    H, W = x.shape[-2:]
    h, w = int(size[0]), int(size[1])
    if h > H or w > W:
        raise ValueError(f"unpad: original size {(h, w)} is larger than the padded map {(H, W)}")
    top, left = pad_offsets((h, w), (H, W))
    return x[..., top : top + h, left : left + w]


# ---------------------------------------------------------------------------------------------
# photometric distortion (mmseg's PhotoMetricDistortion, as used by the public SAK code)
# ---------------------------------------------------------------------------------------------
def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """x * alpha + beta, clipped to [0, 255] and truncated to uint8 (mmseg's `convert`)."""
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


# cv2.cvtColor's uint8 HSV (H in [0, 180) for 0-360 degrees, S and V in [0, 255]) written out in numpy:
# OpenCV is not a dependency, and skimage's float64 conversion is several times slower at 512 px.
def rgb_to_hsv_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) RGB -> uint8 (..., 3) HSV in OpenCV's units."""
    rgb = image.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v, low = rgb.max(-1), rgb.min(-1)
    delta = v - low
    scale = 30.0 / np.where(delta > 0, delta, np.inf)  # half-degrees per unit of difference; 0 for greys
    hue = np.where(v == r, (g - b) * scale, np.where(v == g, 60.0 + (b - r) * scale, 120.0 + (r - g) * scale))
    out = np.empty(image.shape, dtype=np.uint8)
    out[..., 0] = np.rint(np.where(hue < 0, hue + 180.0, hue)).astype(np.int16) % 180
    out[..., 1] = np.rint(255.0 * delta / np.where(v > 0, v, np.inf))
    out[..., 2] = v
    return out


def hsv_uint8_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) HSV in OpenCV's units -> uint8 (..., 3) RGB."""
    h = hsv[..., 0].astype(np.float32) * (2.0 / 60.0)  # hue in sextants, [0, 6)
    s, v = hsv[..., 1].astype(np.float32) / 255.0, hsv[..., 2].astype(np.float32)
    rgb = np.empty(hsv.shape, dtype=np.float32)
    for channel, n in enumerate((5.0, 3.0, 1.0)):  # c = v - v s clip(min(k, 4 - k), 0, 1), k = (n + h) mod 6
        k = (n + h) % 6.0
        rgb[..., channel] = v * (1.0 - s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
    return np.clip(np.floor(rgb), 0, 255).astype(np.uint8)  # truncated as OpenCV's (0.4% of values differ by 1)


def photometric_distortion(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: float = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> uint8: brightness, contrast (before or after the HSV steps, a coin flip),
    saturation and hue in HSV; each step applied with probability 0.5."""
    img = image
    if rng.random() < 0.5:
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        img = _convert(img, alpha=rng.uniform(*contrast_range))
    saturation = rng.uniform(*saturation_range) if rng.random() < 0.5 else None
    hue = int(rng.integers(-hue_delta, hue_delta)) if rng.random() < 0.5 else None
    hsv = rgb_to_hsv_uint8(img)  # always, as the reference: the uint8 round trip itself shifts some values by 1
    if saturation is not None:
        hsv[..., 1] = _convert(hsv[..., 1], alpha=saturation)
    if hue is not None:
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + hue) % 180
    img = hsv_uint8_to_rgb(hsv)
    if not contrast_first and rng.random() < 0.5:
        img = _convert(img, alpha=rng.uniform(*contrast_range))
    return img


# ---------------------------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------------------------
def to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    # truncated, as the reference's PhotoMetricDistortion casts the rescaled float image (`astype(np.uint8)`;
    # rounding made sak's scaled images half a grey level brighter on average). Rounded to a millionth first: a
    # value that should be exactly k came out of `resize_sample` ~1e-14 above or below it with the number of
    # threads (a pixel would move by a grey level between a loader worker and the main process)
    return np.clip(np.floor(np.round(image, 6)), 0, 255).astype(np.uint8)


def ignore_parts_without_people(sample: Sample) -> Sample:
    """Human parts with no part pixel left (no person, or a crop that holds only background) become
    all-ignore, as the reference's AddIgnoreRegions: such images say nothing about parts."""
    parts = sample.get("parts")
    if parts is not None and not ((parts > 0) & (parts != IGNORE_INDEX)).any():
        sample = {**sample, "parts": np.full_like(parts, IGNORE_INDEX)}
    return sample


def dense_train_transform(sample: Sample, rng: np.random.Generator, aug: DenseAugment) -> Sample:
    """scale -> class-ratio crop -> flip -> photometric -> pad to `aug.crop_size` -> parts ignore rule."""
    _check_keys(sample)
    sample = random_scale(sample, rng, *aug.scale_range)
    sample = random_crop(sample, rng, aug.crop_size, aug.cat_max_ratio, aug.cat_max_tries)
    if aug.flip and rng.random() < 0.5:
        sample = hflip(sample)
    image = to_uint8(sample["image"])
    sample = {**sample, "image": photometric_distortion(image, rng) if aug.photometric else image}
    return ignore_parts_without_people(pad(sample, aug.crop_size, aug.image_fill))


def dense_eval_transform(
    sample: Sample, size: tuple[int, int], image_fill: tuple[int, int, int] = IMAGENET_MEAN_UINT8
) -> Sample:
    """Centre the sample in a `size` canvas (no resizing); larger samples are an error, since a batch
    needs one size and the prediction must map back onto every original pixel."""
    _check_keys(sample)
    h, w = sample["image"].shape[:2]
    if h > size[0] or w > size[1]:
        raise ValueError(f"the image is {h}x{w}, larger than the evaluation size {size[0]}x{size[1]}")
    sample = {**sample, "image": to_uint8(sample["image"])}
    return ignore_parts_without_people(pad(sample, size, image_fill))


def to_tensors(sample: Sample) -> dict[str, torch.Tensor]:
    """numpy (H, W[, C]) -> the contract of base.py: image uint8 (3, H, W), semseg / parts int64 (H, W),
    saliency / edges / depth float32 (1, H, W), normals float32 (3, H, W)."""
    out = {}
    for key, value in sample.items():
        if key == "image":
            out[key] = torch.from_numpy(np.ascontiguousarray(value.transpose(2, 0, 1)))
        elif key in ("semseg", "parts"):
            out[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.int64))
        elif key == "normals":
            out[key] = torch.from_numpy(np.ascontiguousarray(value.transpose(2, 0, 1), dtype=np.float32))
        elif key in BUILT_IN_TARGETS:
            out[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))[None]
        else:  # a plug-in's target (add_target): channels first, integers as int64
            whole = np.issubdtype(value.dtype, np.integer) or value.dtype == bool
            channels = value.transpose(2, 0, 1) if value.ndim == 3 else value[None]
            out[key] = torch.from_numpy(np.ascontiguousarray(channels, dtype=np.int64 if whole else np.float32))
    return out


# ---------------------------------------------------------------------------------------------
# unlabelled images (stage 1)
# ---------------------------------------------------------------------------------------------
def random_resized_crop_box(
    h: int, w: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(top, left, height, width) drawn as torchvision's RandomResizedCrop: area share in `scale`,
    log-uniform aspect ratio in `ratio`, 10 attempts, then the centre crop clamped to `ratio`."""
    area = h * w
    log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def center_crop_box(h: int, w: int, fraction: float = 1.0) -> tuple[int, int, int, int]:
    """The centred square of side fraction * min(h, w): resize + centre crop in one step."""
    side = max(1, int(round(min(h, w) * fraction)))
    return (h - side) // 2, (w - side) // 2, side, side


def resized_crop(image: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """uint8 (3, H, W), box (top, left, height, width) -> uint8 (3, size, size), antialiased bilinear
    (what torchvision's RandomResizedCrop does on PIL images)."""
    top, left, h, w = box
    window = image[:, top : top + h, left : left + w].float()[None]
    out = F.interpolate(window, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].round().clamp(0, 255).to(torch.uint8)
