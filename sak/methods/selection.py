"""Choosing a subset of a pool from per-image features (FreeSel's samplers and two baselines), the pools
(a folder of images or a recipe's dataset), budgets and manifests.

Every method returns image indices in the order they were picked, so the first n entries of a
selection for budget N are the selection for budget n (same seed).

- `d2_sampling` (FreeSel's default, "probabilistic"): one image at random, then repeatedly draw a
  semantic pattern with probability proportional to the squared distance from it to the nearest
  pattern of the selected images, and select the image it belongs to (an image is therefore drawn
  with probability proportional to the sum over its patterns of that squared distance). This is
  k-means++ seeding lifted from points to sets of patterns.
- `farthest_point_sampling` (FreeSel's greedy variant): one image at random, then repeatedly the image
  farthest from the selected set, where the distance of an image to the set is the largest distance
  of any of its patterns to the nearest selected pattern, D(I, S) = max_j min_{c in S} d(c_j, c): an
  image is far as soon as one of its patterns is not yet covered.
- `kcenter_greedy` (the core-set baseline): farthest-point sampling with one point per image (its
  global feature).
- `random_subset`: a seeded permutation.

Distances: "cosine" (1 - cosine similarity; FreeSel's default) or "euclidean".
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..data.base import repeated
from ..data.images import IMAGE_EXTENSIONS, DataError, decode_rgb, list_image_files
from ..files import refuse_dangling_link, write_whole

METRICS = ("cosine", "euclidean")
METHODS = ("freesel", "farthest", "kcenter", "random")
MULTINOMIAL_MAX = 2**24  # the most categories torch.multinomial draws from


class SelectionError(ValueError):
    """Bad selection input (budget, pool, manifest); the message says what would be right."""


def resolve_budget(budget: str | int, pool_size: int) -> int:
    """A count ("200", 200) or a share of the pool ("10%") -> a number of images.

    A share is rounded half up, computed exactly from the decimal text (10% of 25 images is 2.5 -> 3,
    of 35 is 3.5 -> 4; Python's `round` would give 2 and 4, halves to even), and is at least 1.

    Raises:
        SelectionError: not a positive count or a percentage in (0, 100], or more images than the pool holds.
    """
    text = str(budget).strip()
    try:
        value = Fraction(text[:-1]) if text.endswith("%") else int(text)  # Fraction: "12.5" exactly, no float error
    except ValueError:
        raise SelectionError(f"budget {text!r} is neither a count (e.g. 200) nor a percentage (e.g. 10%)") from None
    if text.endswith("%"):
        if not 0 < value <= 100:
            raise SelectionError(f"budget {text!r}: a percentage must be in (0, 100]")
        count = max(1, math.floor(pool_size * value / 100 + Fraction(1, 2)))  # half up
    else:
        count = int(value)
    if count < 1:
        raise SelectionError(f"budget {text!r}: select at least one image")
    if count > pool_size:
        raise SelectionError(f"budget {count} is larger than the pool, which holds {pool_size} images")
    return count


def pairwise_distance(a: Tensor, b: Tensor, metric: str) -> Tensor:
    """(n, C), (m, C) -> (n, m) distances; for "cosine" the rows must already be L2-normalised."""
    if metric == "cosine":
        return (1.0 - a @ b.T).clamp_min_(0.0)
    # not cdist's default matrix-product shortcut (past 25 points): its sqrt(|a|^2 + |b|^2 - 2ab) leaves an
    # exact duplicate of a selected pattern a few hundredths away at realistic feature norms; the direct form
    # gives it 0
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


class NearestSelected:
    """For every pattern of the pool, the distance to the nearest pattern of the selected images.

    Args:
        patterns: one (m_i, C) tensor per image (m_i >= 1).
        metric: "cosine" or "euclidean".
        device: where the distances are computed.
    """

    def __init__(self, patterns: Sequence[Tensor], metric: str, device: torch.device | str = "cpu") -> None:
        if metric not in METRICS:
            raise SelectionError(f"unknown distance {metric!r}; expected one of {METRICS}")
        if not patterns or any(p.ndim != 2 or len(p) == 0 for p in patterns):
            raise SelectionError("every image needs at least one pattern, a (m, C) tensor")
        counts = torch.tensor([len(p) for p in patterns])
        self.points = torch.cat(list(patterns)).to(device=device, dtype=torch.float32)  # (P, C)
        finite = torch.isfinite(self.points).all(1)  # (P,): one check for the pool, not one per image
        if not bool(finite.all()):
            owner = torch.repeat_interleave(torch.arange(len(patterns)), counts)
            bad = owner[~finite.cpu()].unique().tolist()
            raise SelectionError(f"the patterns of image(s) {bad[:5]} (pool positions) are not finite (nan or inf): "
                                 "every distance to them would be nan")  # fmt: skip
        if metric == "cosine":
            self.points = F.normalize(self.points, dim=1)
        self.metric = metric
        self.num_images = len(patterns)
        self.owner = torch.repeat_interleave(torch.arange(self.num_images), counts).to(self.points.device)  # (P,)
        self.offsets = [0, *torch.cumsum(counts, 0).tolist()]
        self.dist = torch.full((len(self.points),), math.inf, device=self.points.device)  # (P,)
        self.taken = torch.zeros(self.num_images, dtype=torch.bool, device=self.points.device)

    def add(self, image: int) -> None:
        own = self.points[self.offsets[image] : self.offsets[image + 1]]  # (m, C)
        torch.minimum(self.dist, pairwise_distance(self.points, own, self.metric).amin(1), out=self.dist)
        self.dist[self.offsets[image] : self.offsets[image + 1]] = 0.0  # exact, whatever the rounding
        self.taken[image] = True

    def image_distance(self) -> Tensor:
        """D(I, S) = max over the image's patterns of the distance to the selected set; -1 for taken images."""
        out = torch.full((self.num_images,), -1.0, device=self.dist.device)
        out.scatter_reduce_(0, self.owner, self.dist, reduce="amax", include_self=True)
        return out.masked_fill_(self.taken, -1.0)

    def untaken(self) -> Tensor:
        return (~self.taken).nonzero().flatten().cpu()


def _first(num_images: int, generator: torch.Generator) -> int:
    return int(torch.randint(num_images, (1,), generator=generator))


def _check_budget(budget: int, num_images: int) -> None:
    if not 1 <= budget <= num_images:
        raise SelectionError(f"budget {budget} must be between 1 and the pool size {num_images}")


def farthest_point_sampling(
    patterns: Sequence[Tensor], budget: int, seed: int = 0, metric: str = "cosine", device: str = "cpu"
) -> list[int]:
    """Greedy farthest-point selection over sets of patterns (first image drawn with `seed`).

    Ties go to the lowest image index.
    """
    _check_budget(budget, len(patterns))
    cover = NearestSelected(patterns, metric, device)
    order = [_first(cover.num_images, torch.Generator().manual_seed(seed))]
    cover.add(order[0])
    while len(order) < budget:
        order.append(int(cover.image_distance().argmax()))
        cover.add(order[-1])
    return order


def d2_sampling(
    patterns: Sequence[Tensor], budget: int, seed: int = 0, metric: str = "cosine", device: str = "cpu"
) -> list[int]:
    """FreeSel's probabilistic sampling: draw a pattern with probability proportional to its squared
    distance to the selected set, select its image. When every remaining pattern coincides with a
    selected one (all distances zero) the next image is drawn uniformly from the rest."""
    _check_budget(budget, len(patterns))
    generator = torch.Generator().manual_seed(seed)
    cover = NearestSelected(patterns, metric, device)
    order = [_first(cover.num_images, generator)]
    cover.add(order[0])
    while len(order) < budget:
        weight = cover.dist.double().square().cpu()  # (P,); zero on the selected images' patterns
        total = float(weight.sum())
        if total > 0 and math.isfinite(total):
            if len(weight) <= MULTINOMIAL_MAX:
                pattern = int(torch.multinomial(weight / total, 1, generator=generator))
            else:  # torch.multinomial takes at most 2**24 categories: the same draw by inverse CDF
                cdf = weight.cumsum(0)
                u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
                pattern = min(int(torch.searchsorted(cdf, u, right=True)), len(cdf) - 1)
            image = int(cover.owner[pattern])
        else:
            rest = cover.untaken()
            image = int(rest[torch.randint(len(rest), (1,), generator=generator)])
        order.append(image)
        cover.add(image)
    return order


def kcenter_greedy(
    features: Tensor, budget: int, seed: int = 0, metric: str = "cosine", device: str = "cpu"
) -> list[int]:
    """Core-set k-center greedy on one (global) feature per image: features (n, C)."""
    return farthest_point_sampling(list(features[:, None]), budget, seed, metric, device)


def random_subset(num_images: int, budget: int, seed: int = 0) -> list[int]:
    _check_budget(budget, num_images)
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))[:budget].tolist()


def check_ids(ids: Sequence[str]) -> None:
    """Ids a manifest can hold, one per line, each once.

    Raises:
        SelectionError: an id that a manifest line cannot hold (empty, a `#`, surrounding blanks, a line break:
            `\r` too, which a reader's universal newlines would split), or an id given twice.
    """
    for i in ids:
        if not i or "#" in i or i != i.strip() or "\n" in i or "\r" in i:
            raise SelectionError(f"image id {i!r} cannot be written to a manifest (no '#', line breaks or edge blanks)")
        try:
            i.encode("utf-8")
        except UnicodeEncodeError:  # a file name in another encoding than the file system's (os.fsdecode)
            raise SelectionError(f"image id {i!r} is not valid text (a file name in another encoding than UTF-8); "
                                 "a manifest is UTF-8: rename the file") from None  # fmt: skip
    twice = repeated(list(ids))
    if twice:
        raise SelectionError(f"the pool gives the image id(s) {twice[:5]} to more than one image; a manifest names "
                             "each image once")  # fmt: skip


def check_writable(path: str | Path) -> None:
    """Refuse an output path that is a folder, lies under a file or in a folder this user may not write into,
    before any work."""
    path = Path(path)
    refuse_dangling_link(path, "--out")
    if path.is_dir():
        raise SelectionError(f"--out {str(path)!r} is a folder; give the manifest file's path")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise SelectionError(f"--out {str(path)!r} lies under {str(above)!r}, which is a file, not a folder")
    if above is not None and not os.access(above, os.W_OK | os.X_OK):  # (found after the whole feature pass)
        raise SelectionError(f"--out {str(path)!r}: no permission to write into {str(above)!r}")


def write_manifest(path: str | Path, ids: Sequence[str], header: Sequence[str] = ()) -> Path:
    """Write `ids` one per line (readable by `sak.data.read_manifest`), after `# ` comment lines (every line of
    a header item, so that a line break in it does not turn the rest into an id). Written to a temporary file
    beside it and renamed: an interrupted write (a full disk) leaves the earlier manifest, not a cut one.

    Raises:
        SelectionError: ids that `check_ids` refuses.
    """
    check_ids(ids)
    path = Path(path)
    check_writable(path)
    lines = [f"# {part}" for h in header for part in (str(h).splitlines() or [""])] + list(ids)
    text = "\n".join(lines) + "\n"  # the header may quote a --pool path that is no valid text; the ids are checked
    return write_whole(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="backslashreplace"))


# ---------------------------------------------------------------------------------------------------
# Pools and the method dispatch
# ---------------------------------------------------------------------------------------------------
@dataclass
class ImageFeatures:
    """What the feature pass keeps per image: its position in the pool, its id, its semantic patterns
    (m, C) with 1 <= m <= k, and its global feature (C,) (mean of all patch features, for k-center)."""

    index: int
    id: str
    patterns: Tensor
    global_feature: Tensor


class ImageFolderPool(Dataset):
    """Every image file under `root` (recursive, symlinked folders followed); ids are relative paths without
    extension, sorted. The listing and the decoding are the `image_folder` dataset's (`list_image_files`,
    `decode_rgb`), so a manifest written here selects the same files there.

    Samples are {"image": uint8 (3, H, W), "id": str, "index": int}, as sak datasets give them.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SelectionError(f"pool {str(root)!r} is neither a folder of images nor a recipe (.yaml) file")
        try:
            by_id = list_image_files(self.root)
        except ValueError as exc:
            raise SelectionError(f"pool {exc}") from None
        if not by_id:
            raise SelectionError(f"pool {self.root}: no image files ({' '.join(IMAGE_EXTENSIONS)}) under it")
        self.ids = list(by_id)
        self.paths = [self.root / by_id[i] for i in self.ids]
        self.source = f"pool folder: {self.root.resolve()}"  # for a manifest's header

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        try:
            array = decode_rgb(self.paths[index])
        except DataError as exc:
            raise SelectionError(f"pool {self.root}: cannot read image: {exc}") from exc
        return {"image": torch.from_numpy(array).permute(2, 0, 1), "id": self.ids[index], "index": index}


class UnpaddedImages(Dataset):
    """A recipe dataset's images as they are stored, so that the teacher sees the whole photograph, resized by
    its own preprocessing as FreeSel's code feeds raw VOC images (a squash to 224 x 224): the dense datasets'
    (PASCAL-Context, NYUD) evaluation samples with the padding taken off (they centre each image on a fixed
    canvas and give its original (h, w) as "size"; `unpad` crops that back); the unlabelled ones'
    (`image_folder`, `image_tar`) photographs read as they are, not their evaluation centre crop, and an
    unreadable one is an error (`skip_bad` would stand the next image in, under its id). Other samples pass
    unchanged."""

    def __init__(self, dataset: Dataset, source: str = "") -> None:
        self.dataset = dataset
        self.source = source  # what the images are, for a manifest's header (`open_pool`)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        from ..data.images import UnlabelledImages
        from ..data.transforms import unpad

        images = getattr(self.dataset, "dataset", self.dataset)  # (inside the loader's IndexedDataset)
        if isinstance(images, UnlabelledImages):  # the photograph, not its evaluation centre crop
            try:
                array = images.read(index)
            except DataError as exc:  # (data.options.skip_bad would stand another image in, under its id)
                raise SelectionError(f"pool: cannot read image {images.ids[index]!r}: {exc}") from exc
            return {"image": torch.from_numpy(array).permute(2, 0, 1), "id": images.ids[index], "index": index}
        sample = self.dataset[index]
        image = sample["image"]
        if "size" in sample:
            image = unpad(image, tuple(sample["size"].tolist()))
        return {"image": image, "id": sample["id"], "index": index}


def open_pool(pool: str, overrides: Sequence[str] = ()) -> tuple[Dataset, list[str] | None]:
    """A folder of images, or a recipe whose `data` section names a registered dataset (its `data.split`,
    without training augmentation and without the evaluation padding, see `UnpaddedImages`; `overrides` are
    recipe `key=value`s). Returns the dataset and its ids when they are known without reading the images."""
    if Path(pool).suffix.lower() in (".yaml", ".yml"):
        import dataclasses

        from ..config import load_recipe
        from ..engine.build import build_loader

        recipe = load_recipe(pool, list(overrides))
        recipe = dataclasses.replace(recipe, tasks=[])  # images only, no targets to load
        dataset = build_loader(recipe, recipe.data.split, train=False).dataset
        ids = getattr(getattr(dataset, "dataset", None), "ids", None)
        data = recipe.data
        where = {
            k: os.path.abspath(v) if v is not None else None for k, v in (("root", data.root), ("subset", data.subset))
        }
        source = (f"data: name={data.name} root={where['root']} split={data.split} subset={where['subset']} "
                  f"options={json.dumps(data.options, sort_keys=True, default=str)}")  # fmt: skip
        return UnpaddedImages(dataset, source), list(ids) if ids is not None else None
    if overrides:
        raise SelectionError(f"--set applies to recipe pools; {pool!r} is a folder")
    dataset = ImageFolderPool(pool)
    return dataset, dataset.ids


def select_indices(
    method: str,
    budget: int,
    num_images: int,
    features: Sequence[ImageFeatures] | None = None,
    seed: int = 0,
    metric: str = "cosine",
    device: str | torch.device = "cpu",
) -> list[int]:
    """Run one method: freesel (d^2 sampling on patterns), farthest (farthest-point on patterns),
    kcenter (k-center greedy on global features) or random. `features` (ordered by index) is needed
    by all but random."""
    if method not in METHODS:
        raise SelectionError(f"unknown selection method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "random":
        return random_subset(num_images, budget, seed)
    if features is None or len(features) != num_images:
        raise SelectionError(f"method {method!r} needs the features of all {num_images} images")
    if method == "kcenter":
        return kcenter_greedy(torch.stack([f.global_feature for f in features]), budget, seed, metric, str(device))
    sampler = d2_sampling if method == "freesel" else farthest_point_sampling
    return sampler([f.patterns for f in features], budget, seed, metric, str(device))
