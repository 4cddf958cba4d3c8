"""Real photographs that ship inside installed packages (scikit-image, scikit-learn, matplotlib),
so that the demo distils on real images on a machine with no dataset downloads.

The train split draws random resized crops from seven photographs; the val split holds out two
others (a flower and Grace Hopper's portrait), with fixed crops, for held-out measurements.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..registry import DATASETS
from .base import DatasetSpec, SakDataset, subset_rows

TRAIN_IMAGES = ["astronaut", "chelsea", "coffee", "rocket", "china", "hubble_deep_field", "immunohistochemistry"]
VAL_IMAGES = ["flower", "grace_hopper"]


@cache
def load_package_image(name: str) -> np.ndarray:
    """(H, W, 3) uint8 photograph by name; a clear error names the package to install."""
    try:
        if name in ("china", "flower"):
            from sklearn.datasets import load_sample_image

            return load_sample_image(f"{name}.jpg")
        if name == "grace_hopper":
            from matplotlib import cbook

            with cbook.get_sample_data("grace_hopper.jpg") as f:
                return np.asarray(Image.open(f).convert("RGB"))
        import skimage.data

        image = getattr(skimage.data, name)()
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"package image {name!r} is not available ({exc}); the built-in names are "
            f"{TRAIN_IMAGES + VAL_IMAGES} (scikit-image, scikit-learn, matplotlib must be installed)"
        ) from exc
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def crop_resize(image: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """uint8 (3, H, W), box (top, left, height, width) -> uint8 (3, size, size), antialiased bilinear."""
    t, left, h, w = box
    crop = image[:, t : t + h, left : left + w].float()[None]
    out = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].round().clamp(0, 255).to(torch.uint8)


@DATASETS.register("package_images")
class PackageImages(SakDataset):
    supported_tasks = ()
    train_only_options = ("min_scale",)

    @dataclass
    class Options:
        images: list[str] = field(default_factory=list)  # default: TRAIN_IMAGES or VAL_IMAGES by split
        crops_per_image: int = 32
        min_scale: float = 0.2  # smallest crop area as a share of the image (RandomResizedCrop)

    def __init__(self, spec: DatasetSpec, options: Options) -> None:
        super().__init__(spec, options)
        names = options.images or (TRAIN_IMAGES if spec.split == "train" else VAL_IMAGES)
        self.images = [torch.from_numpy(load_package_image(n).copy()).permute(2, 0, 1).contiguous() for n in names]
        self.names = names
        every = [self._id(i) for i in range(len(self.images) * options.crops_per_image)]
        self.ids, self._rows = subset_rows(every, spec.subset, spec)

    def _id(self, row: int) -> str:
        return f"{self.names[row % len(self.images)]}_{row // len(self.images):04d}"

    def __len__(self) -> int:
        return len(self.ids)

    def content_digests(self) -> list[tuple[str, str]]:
        """Of the decoded photographs (they come from the packages' own loaders, not from named files)."""
        return [(f"package image {n!r}", hashlib.sha256(im.numpy().tobytes()).hexdigest())
                for n, im in zip(self.names, self.images, strict=True)]  # fmt: skip

    def _box(self, index: int, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        k = index // len(self.images)
        if not self.spec.train:  # fixed crops: the centre square, then a sweep of smaller squares
            side = min(h, w) if k == 0 else int(min(h, w) * (0.4 + 0.5 * ((k * 0.618) % 1)))
            ty, tx = ((k * 0.37) % 1, (k * 0.73) % 1) if k else (0.5, 0.5)
            return int((h - side) * ty), int((w - side) * tx), side, side
        for _ in range(10):  # RandomResizedCrop: area share and aspect ratio (3/4 .. 4/3, log-uniform)
            area = h * w * rng.uniform(self.options.min_scale, 1.0)
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            ch, cw = int(round(np.sqrt(area / ratio))), int(round(np.sqrt(area * ratio)))
            if 0 < ch <= h and 0 < cw <= w:
                return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
        side = min(h, w)
        return (h - side) // 2, (w - side) // 2, side, side

    def __getitem__(self, index: int) -> dict:
        row = self._rows[index]  # the crop's position in the full list (differs under data.subset)
        image = self.images[row % len(self.images)]
        rng = self.sample_rng(row)
        box = self._box(row, *image.shape[-2:], rng)
        out = crop_resize(image, box, self.spec.image_size)
        if self.spec.train and rng.random() < 0.5:
            out = out.flip(-1)
        return {"image": out, "id": self.ids[index]}
