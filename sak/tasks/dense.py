"""The dense tasks of PASCAL-Context and NYUD-v2 with SAK's losses and weights (SAK, ICLR 2025).

PASCAL-Context weights: semseg CE x1, human parts CE x2, saliency class-balanced BCE x5, normals L1 on
L2-normalised predictions x10, edges balanced BCE with positive weight 0.95 x50. NYUD-v2: semseg 1,
normals 10, edges 50, depth L1 1 (the recipe sets those through `tasks[i].weight`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import TASKS
from .base import Task, stretch

IGNORE = 255

# The losses here never ask the host for a tensor's value (no `if tensor`, `.item()` or boolean-mask
# indexing) and make no tensor from Python numbers on the device: each of those makes the CPU wait for
# the GPU to finish everything queued before it, so the next kernels are launched only once the GPU has
# gone idle. Empty selections are handled by clamping the count instead: a batch with no valid pixel
# gives 0, with zero gradients.


def balanced_bce(logits: Tensor, target: Tensor, pos_weight: float | None) -> Tensor:
    """Class-balanced BCE over valid pixels (target 255 = ignore).

    pos_weight None: the weight of positives is the share of negatives in the batch; a number fixes
    it (edges: 0.95). Positives get `w`, negatives `1 - w`; summed, divided by the number of valid
    pixels (equal to the public SAK code's BCE with pos_weight w / (1 - w), scaled by 1 - w).
    """
    valid = target != IGNORE
    y = torch.where(valid, target, torch.zeros_like(target)).float()
    if pos_weight is None:
        n_valid = valid.sum().clamp_min(1)
        w = ((1 - y) * valid).sum() / n_valid
    else:
        w = float(pos_weight)  # a Python number: no tensor to copy to the device on every step
    loss_pos = F.binary_cross_entropy_with_logits(logits.float(), torch.ones_like(y), reduction="none")
    loss_neg = F.binary_cross_entropy_with_logits(logits.float(), torch.zeros_like(y), reduction="none")
    loss = (w * y * loss_pos + (1 - w) * (1 - y) * loss_neg) * valid
    return loss.sum() / valid.sum().clamp_min(1)


def grey(probability: Tensor) -> np.ndarray:
    """(1, H, W) probabilities -> (H, W, 3) uint8 grey on the fixed scale 0..1 (0 black, 1 white)."""
    v = np.rint(probability.detach().float().cpu().numpy()[0].clip(0, 1) * 255).astype(np.uint8)
    return np.repeat(v[..., None], 3, axis=-1)


def labels_outside(target: Tensor, allowed: int, what: str) -> str | None:
    """None when every value of a label map is a whole number below `allowed` or IGNORE; else what the first
    other one is (`what`: whose labels, e.g. "the semseg head has 4 channel(s), for classes"). An integer map
    within range costs one min / max; any other, one mask."""
    if target.is_floating_point():
        bad = ~((target >= 0) & (target < allowed) & (target == target.floor()) | (target == IGNORE))
    else:
        if target.numel() == 0:
            return None
        low, high = torch.aminmax(target)
        if low >= 0 and high < allowed:
            return None
        bad = ((target < 0) | (target >= allowed)) & (target != IGNORE)
    if not bool(bad.any()):
        return None
    values = target[bad]
    return (f"its target holds the value {float(values[0]):g} ({values.numel()} pixel(s)), and {what} "
            f"0..{allowed - 1} ({IGNORE} ignored)")  # fmt: skip


def not_a_map(target, shapes: str, ok: bool) -> str | None:
    """What the target is when it is not a tensor of `shapes` (`ok`: its shape is one of them)."""
    if not isinstance(target, Tensor):
        return f"its target is a {type(target).__name__}, not a tensor ({shapes}; sak.data.transforms.to_tensors)"
    return None if ok else f"its target is {tuple(target.shape)}, not {shapes}"


class _Segmentation(Task):
    def target_problem(self, target: Tensor) -> str | None:
        wrong = not_a_map(target, "(H, W) class indices", isinstance(target, Tensor) and target.ndim == 2)
        what = f"the {self.name} head has {self.channels} channel(s) (tasks[].channels), for classes"
        return wrong or labels_outside(target, self.channels, what)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean cross-entropy over the valid pixels; 0 where there is none (human parts on a batch
        without people)."""
        target = target.long()
        total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")
        return total / (target != IGNORE).sum().clamp_min(1)

    def predict(self, logits: Tensor) -> Tensor:
        return logits.argmax(1)  # (B, H, W) class indices


@TASKS.register("semseg")
class SemanticSegmentation(_Segmentation):
    name = "semseg"
    default_channels = 21
    default_weight = 1.0


@TASKS.register("parts")
class HumanParts(_Segmentation):
    name = "parts"
    default_channels = 7
    default_weight = 2.0


@TASKS.register("saliency")
class Saliency(Task):
    """Two-class softmax head with class-balanced cross-entropy, as the public SAK code: the positive
    class is weighted by the share of negative pixels in the batch, the negative class by the rest."""

    name = "saliency"
    default_channels = 2
    fixed_channels = True
    default_weight = 5.0

    def target_problem(self, target: Tensor) -> str | None:
        shaped = isinstance(target, Tensor) and (target.ndim == 2 or target.ndim == 3 and target.shape[0] == 1)
        return not_a_map(target, "(1, H, W) or (H, W) labels", shaped) or labels_outside(
            target, 2, "saliency's labels are"
        )

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        label = target[:, 0].long() if target.ndim == 4 else target.long()  # (B, H, W), 255 = ignore
        valid = label != IGNORE
        n_valid = valid.sum().clamp_min(1)
        w = ((1.0 - label.float()) * valid).sum() / n_valid  # the share of negatives among the valid pixels
        weight = torch.stack([1 - w, w])
        loss = F.cross_entropy(logits.float(), label, weight=weight, ignore_index=IGNORE, reduction="sum")
        return loss / n_valid

    def predict(self, logits: Tensor) -> Tensor:
        return logits.float().softmax(1)[:, 1:2]  # (B, 1, H, W) probability of "salient"

    def visualize(self, prediction: Tensor) -> np.ndarray:
        return grey(prediction)


@TASKS.register("edges")
class Edges(Task):
    name = "edges"
    fixed_channels = True
    default_weight = 50.0

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return balanced_bce(logits, target, pos_weight=0.95)

    def predict(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits.float())

    def visualize(self, prediction: Tensor) -> np.ndarray:
        return grey(prediction)  # edges white on black


def masked_l1(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Sum of |pred - target| over channels and valid pixels, divided by the number of valid pixels
    (the public SAK / multi-task convention: a per-pixel L1 summed over channels); 0 without any. The target
    has the prediction's shape: broadcasting a (B, H, W) depth map against (B, 1, H, W) would compare every
    image with every other's target without an error."""
    if pred.shape != target.shape:
        raise ValueError(f"a dense target of shape {tuple(target.shape)} for predictions of shape "
                         f"{tuple(pred.shape)}: it must be (B, C, H, W) as they are (depth: (B, 1, H, W))")  # fmt: skip
    return ((pred - target).abs() * valid).sum() / valid.sum().clamp_min(1)


@TASKS.register("normals")
class SurfaceNormals(Task):
    name = "normals"
    default_channels = 3
    fixed_channels = True
    default_weight = 10.0

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        valid = target.abs().sum(1, keepdim=True) > 0  # all-zero ground truth = ignore
        return masked_l1(F.normalize(logits.float(), dim=1), target.float(), valid)

    def predict(self, logits: Tensor) -> Tensor:
        return F.normalize(logits.float(), dim=1)

    def visualize(self, prediction: Tensor) -> np.ndarray:
        """The usual picture of normals, x y z -> R G B as (n + 1) / 2 (the stored PNG's colours)."""
        n = prediction.detach().float().cpu().numpy().transpose(1, 2, 0)
        return np.rint((n.clip(-1, 1) + 1) * 127.5).astype(np.uint8)


@TASKS.register("depth")
class Depth(Task):
    name = "depth"
    fixed_channels = True
    default_weight = 1.0

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return masked_l1(logits.float(), target.float(), target > 0)

    def predict(self, logits: Tensor) -> Tensor:
        # Metres, none below 0: the head's raw output can be negative, which `sak predict` wrote into its .npy
        # files. The scores do not change: the metric takes every prediction <= 0 as 1e-9, as the reference. A
        # non-finite output stays as it is, -inf included, for the checks that refuse it to name the image.
        depth = logits.float()
        return depth.masked_fill((depth < 0) & depth.isfinite(), 0.0)

    def visualize(self, prediction: Tensor) -> np.ndarray:
        """Near bright, far dark (viridis over the 2-98% range of the picture's depths); no depth (<= 0) black."""
        from matplotlib import colormaps

        d = prediction.detach().float().cpu().numpy()[0]
        valid = np.isfinite(d) & (d > 0)
        nearness = 1 - stretch(np.where(valid, d, 0), valid)
        rgb = np.rint(colormaps["viridis"](nearness)[..., :3] * 255).astype(np.uint8)
        return np.where(valid[..., None], rgb, np.uint8(0))

    def unscale(self, prediction: Tensor, scale: float) -> Tensor:
        """Training divides depth by the resize factor (an image enlarged k times looks k times closer;
        `resize_sample`): a prediction on an image shrunk by `scale` is that much too far."""
        return prediction * scale
