"""A generated multi-task dataset: every sample is a function of (seed, index), so tests and the
walking-skeleton demo need no files. Images are coloured shapes on a textured background; the
targets are consistent with them (class map, foreground saliency, class boundaries, per-class depth
and normals), so every task is learnable."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ..registry import DATASETS
from .base import IGNORE_INDEX, DatasetSpec, SakDataset, subset_rows


@DATASETS.register("synthetic")
class SyntheticDataset(SakDataset):
    supported_tasks = ("semseg", "parts", "saliency", "edges", "normals", "depth")

    @dataclass
    class Options:
        length: int = 64  # samples per split
        classes: int = 5  # semseg classes, background included
        shapes: int = 3  # shapes per image

    def __init__(self, spec: DatasetSpec, options: Options) -> None:
        super().__init__(spec, options)
        offset = {"train": 0, "val": 1_000_000}.get(spec.split, 2_000_000)
        self.ids, self._rows = subset_rows([f"{spec.split}_{i:06d}" for i in range(options.length)], spec.subset, spec)
        self._offset = offset
        self.palette = np.random.default_rng(1234).integers(0, 256, size=(max(options.classes, 2), 3))

    def __len__(self) -> int:
        return len(self.ids)

    def _layout(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Class map (S, S) and image (S, S, 3) for one sample, fixed by (seed, split, index)."""
        s, o = self.spec.image_size, self.options
        rng = np.random.default_rng([self.spec.seed, self._offset + index])
        yy, xx = np.mgrid[0:s, 0:s]
        label = np.zeros((s, s), dtype=np.int64)
        for _ in range(o.shapes):
            cls = int(rng.integers(1, o.classes))
            cy, cx = rng.uniform(0.15, 0.85, size=2) * s
            r = rng.uniform(0.1, 0.3) * s
            if rng.random() < 0.5:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            else:
                mask = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r * rng.uniform(0.5, 1.0))
            label[mask] = cls
        image = self.palette[label].astype(np.float32)
        image += rng.normal(0, 12, size=image.shape) + 20 * np.sin(xx / 7.0 + rng.uniform(0, 6))[..., None]
        return label, np.clip(image, 0, 255).astype(np.uint8)

    def __getitem__(self, index: int) -> dict:
        row = self._rows[index]  # the sample's position in the full split (differs under data.subset)
        label, image = self._layout(row)
        flip = self.spec.train and self.sample_rng(row).random() < 0.5
        if flip:
            label, image = label[:, ::-1].copy(), image[:, ::-1].copy()
        sample = {"image": torch.from_numpy(image).permute(2, 0, 1).contiguous(), "id": self.ids[index]}
        for task in self.spec.tasks:
            sample[task] = self._target(task, label, flip)
        if not self.spec.train:  # (the evaluation contract: the original size, the whole sample here)
            sample["size"] = torch.tensor(label.shape, dtype=torch.int64)
        return sample

    def _target(self, task: str, label: np.ndarray, flip: bool) -> torch.Tensor:
        if task == "semseg":
            return torch.from_numpy(label)
        if task == "parts":  # shapes of class 1 play "people" with two parts; other images: all ignore
            parts = np.full_like(label, IGNORE_INDEX)
            if (label == 1).any():
                parts[:] = 0
                rows = np.nonzero((label == 1).any(1))[0]
                mid = (rows.min() + rows.max()) // 2
                parts[(label == 1)] = 2
                parts[:mid][label[:mid] == 1] = 1
            return torch.from_numpy(parts)
        if task == "saliency":
            return torch.from_numpy((label > 0).astype(np.float32))[None]
        if task == "edges":
            edge = ndimage.morphological_gradient(label, size=3) > 0
            return torch.from_numpy(edge.astype(np.float32))[None]
        depth = 1.0 + label.astype(np.float32) * 0.5  # metres; each class a plane at its own distance
        if task == "depth":
            return torch.from_numpy(depth)[None]
        if task == "normals":
            gy, gx = np.gradient(ndimage.gaussian_filter(depth, 2.0))
            n = np.stack([-gx, -gy, np.ones_like(depth)], 0)  # computed on the flipped map already
            n /= np.linalg.norm(n, axis=0, keepdims=True)
            return torch.from_numpy(n.astype(np.float32))
        raise KeyError(task)
