"""Small datasets written in the exact on-disk formats of PASCAL-Context ("PASCAL_MT") and NYUD-v2
("NYUD_MT"): same folders, file types, .mat structs and field names, split files and class lists as the
real releases, with structured content (rooms and outdoor scenes, objects, people with and without part
annotations) so that every task's target means what it means on the real data. Used by the tests and by
anyone who wants to try a recipe without the real data:

    python -m sak.data.fixtures pascal_context /tmp/PASCAL_MT --train 8 --val 4
    python -m sak.data.fixtures nyud /tmp/NYUD_MT --train 8 --val 4

Class indices are the real ones (PASCAL-Context's 459 labels, VOC's 21, Pascal-Part's person parts, NYU's
fine and 40-class labels); the class lists hold the subset that the fixtures draw.
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image
from scipy import ndimage
from skimage import draw

__all__ = ["write_nyud", "write_pascal_context"]

# Real PASCAL-Context (459-label) indices of the classes the fixtures draw, and a few more.
CONTEXT_CLASSES = {
    "aeroplane": 2, "bed": 18, "bicycle": 23, "bird": 25, "boat": 31, "book": 33, "bottle": 34, "building": 44,
    "bus": 45, "cabinet": 46, "car": 59, "cat": 65, "ceiling": 68, "chair": 72, "cow": 98, "curtain": 105,
    "dog": 113, "door": 115, "floor": 158, "grass": 187, "ground": 189, "horse": 207, "motorbike": 258,
    "mountain": 259, "person": 284, "pottedplant": 308, "road": 324, "sheep": 347, "sky": 360, "sofa": 368,
    "table": 397, "train": 416, "tree": 420, "tvmonitor": 427, "unknown": 431, "wall": 440, "water": 445,
    "window": 454,
}  # fmt: skip
# Context index of each VOC class (VOC index = position; 0 = background).
VOC_CONTEXT_IDS = (0, 2, 23, 25, 31, 34, 45, 59, 65, 72, 98, 397, 113, 207, 258, 284, 308, 347, 368, 416, 427)
# Real indices of some of NYU's fine labels (the names the normals-validity rule compares).
NYU_FINE_CLASSES = {
    "book": 1, "bottle": 2, "cabinet": 3, "ceiling": 4, "chair": 5, "counter": 7, "floor": 11, "table": 19,
    "unknown": 20, "wall": 21, "sink": 24, "box": 26, "door": 28, "cup": 35, "picture": 64, "sofa": 83,
    "curtain": 89, "pillow": 119, "mirror": 122, "lamp": 144, "bed": 157, "television": 172, "person": 331,
}  # fmt: skip
# Pascal-Part's fine person parts (pascal_part.json, class "15").
PERSON_PART_IDS = {
    "head": 1, "leye": 2, "reye": 3, "lear": 4, "rear": 5, "lebrow": 6, "rebrow": 7, "nose": 8, "mouth": 9,
    "hair": 10, "torso": 11, "neck": 12, "llarm": 13, "luarm": 14, "lhand": 15, "rlarm": 16, "ruarm": 17,
    "rhand": 18, "llleg": 19, "luleg": 20, "lfoot": 21, "rlleg": 22, "ruleg": 23, "rfoot": 24,
}  # fmt: skip
NYU40 = {"wall": 1, "floor": 2, "cabinet": 3, "bed": 4, "chair": 5, "sofa": 6, "table": 7, "window": 9,
         "picture": 11, "desk": 14, "ceiling": 22, "television": 25, "box": 29, "lamp": 35}  # fmt: skip
VOC_CLASS_INDEX = {n: VOC_CONTEXT_IDS.index(c) for n, c in CONTEXT_CLASSES.items() if c in VOC_CONTEXT_IDS[1:]}
FURNITURE = ("cabinet", "bed", "chair", "sofa", "table", "desk", "television", "box", "lamp")
INDOOR_OBJECTS = ("chair", "table", "sofa", "tvmonitor", "bottle", "pottedplant", "cat", "dog")
OUTDOOR_OBJECTS = ("car", "bus", "horse", "cow", "sheep", "bird", "aeroplane", "boat", "bicycle", "motorbike", "train")
ANIMALS = ("cat", "dog", "horse", "cow", "sheep", "bird")
# Colour regions of a person (rendering only): skin, clothes, trousers, shoes, hair.
SKIN, SHIRT, TROUSERS, SHOES, HAIR = 1001, 1002, 1003, 1004, 1005
PART_REGION = {**dict.fromkeys(["head", "lear", "rear", "nose", "neck", "lhand", "rhand"], SKIN),
               **dict.fromkeys(["torso", "luarm", "ruarm", "llarm", "rlarm"], SHIRT),
               **dict.fromkeys(["luleg", "ruleg", "llleg", "rlleg"], TROUSERS),
               **dict.fromkeys(["lfoot", "rfoot"], SHOES),
               **dict.fromkeys(["hair", "leye", "reye", "lebrow", "rebrow", "mouth"], HAIR)}  # fmt: skip
UP, DOWN, FRONT = np.array([0.0, 1.0, 0.0]), np.array([0.0, -1.0, 0.0]), np.array([0.0, 0.0, 1.0])


@dataclass
class SceneObject:
    name: str
    voc_index: int
    parts: dict[str, int] = field(default_factory=dict)  # part name -> id in Scene.part_ids
    annotated: bool = True  # False: a person without part annotations (Pascal-Part's empty `parts`)


@dataclass
class Scene:
    """Per-pixel ground truth of one generated image; everything else is derived from it."""

    label_map: np.ndarray  # (H, W) context ids (PASCAL, uint16) or NYU-40 ids (NYUD)
    normals: np.ndarray  # (H, W, 3) unit vectors: x right, y up, z towards the camera
    regions: np.ndarray  # (H, W) colour region (the label, or a person's skin / clothes)
    instances: np.ndarray  # (H, W) 0 = none, k + 1 = objects[k]
    part_ids: np.ndarray  # (H, W) 0 = none, else the id of one part of one object
    depth: np.ndarray | None = None  # (H, W) metres
    objects: list[SceneObject] = field(default_factory=list)
    n_parts: int = 0  # part ids handed out so far

    def paint(self, mask: np.ndarray, label: int, normal: np.ndarray, region: int | None = None) -> None:
        self.label_map[mask] = label
        self.normals[mask] = normal
        self.regions[mask] = label if region is None else region


def _bulge(shape: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """Normals of a rounded object over `box` (top, left, bottom, right): a squashed hemisphere."""
    top, left, bottom, right = box
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    dx = np.clip((xx - (left + right) / 2) / max((right - left) / 2, 1), -1, 1) * 0.8
    dy = np.clip((yy - (top + bottom) / 2) / max((bottom - top) / 2, 1), -1, 1) * 0.8
    n = np.stack([dx, -dy, np.sqrt(np.clip(1 - dx**2 - dy**2, 0.05, 1))], -1)
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def _limb(p0: tuple[float, float], p1: tuple[float, float], half: float, shape: tuple[int, int]) -> np.ndarray:
    """Mask of a thick segment from p0 to p1 (row, col) with half-width `half`."""
    (r0, c0), (r1, c1) = p0, p1
    length = max(np.hypot(r1 - r0, c1 - c0), 1e-6)
    nr, nc = -(c1 - c0) / length * half, (r1 - r0) / length * half
    rr, cc = draw.polygon([r0 + nr, r1 + nr, r1 - nr, r0 - nr], [c0 + nc, c1 + nc, c1 - nc, c0 - nc], shape)
    mask = np.zeros(shape, dtype=bool)
    mask[rr, cc] = True
    return mask


def _disk(center: tuple[float, float], radius: float, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[draw.disk(center, max(radius, 0.5), shape=shape)] = True
    return mask


def _person_parts(top: float, cx: float, u: float, rng: np.random.Generator, shape) -> list[tuple[str, np.ndarray]]:
    """Fine Pascal-Part person parts of a figure 8u tall facing the camera (its left = image right),
    in drawing order (later parts cover earlier ones)."""
    j = lambda: rng.uniform(-0.4, 0.4) * u  # noqa: E731 - a pose jitter
    parts = []
    for side, s in (("l", 1), ("r", -1)):
        hip, knee = (top + 4.2 * u, cx + s * 0.35 * u), (top + 5.9 * u, cx + s * 0.45 * u + j())
        ankle = (top + 7.6 * u, knee[1] + j() * 0.5)
        parts += [
            (f"{side}uleg", _limb(hip, knee, 0.3 * u, shape)),
            (f"{side}lleg", _limb(knee, ankle, 0.24 * u, shape)),
        ]
        parts.append((f"{side}foot", _limb(ankle, (ankle[0] + 0.3 * u, ankle[1] + s * 0.35 * u), 0.15 * u, shape)))
    torso = np.zeros(shape, dtype=bool)
    rr, cc = draw.rectangle((top + 1.5 * u, cx - 0.7 * u), (top + 4.3 * u, cx + 0.7 * u), shape=shape)
    torso[rr, cc] = True
    parts.append(("torso", torso))
    for side, s in (("l", 1), ("r", -1)):
        shoulder = (top + 1.7 * u, cx + s * 0.8 * u)
        elbow = (shoulder[0] + 1.3 * u, shoulder[1] + s * abs(j()))
        wrist = (elbow[0] + 1.2 * u, elbow[1] + j())
        parts += [
            (f"{side}uarm", _limb(shoulder, elbow, 0.2 * u, shape)),
            (f"{side}larm", _limb(elbow, wrist, 0.17 * u, shape)),
        ]
        parts.append((f"{side}hand", _disk(wrist, 0.22 * u, shape)))
    head_c = (top + 0.6 * u, cx)
    parts += [
        ("neck", _limb((top + 1.0 * u, cx), (top + 1.6 * u, cx), 0.2 * u, shape)),
        ("head", _disk(head_c, 0.55 * u, shape)),
    ]
    hair = _disk(head_c, 0.58 * u, shape)
    hair[int(np.ceil(top + 0.35 * u)) :] = False
    parts.append(("hair", hair))
    for side, s in (("l", 1), ("r", -1)):
        parts += [(f"{side}ear", _disk((head_c[0], cx + s * 0.55 * u), 0.12 * u, shape)),
                  (f"{side}eye", _disk((top + 0.55 * u, cx + s * 0.2 * u), 0.08 * u, shape)),
                  (f"{side}ebrow", _limb((top + 0.42 * u, cx + s * 0.1 * u), (top + 0.42 * u, cx + s * 0.3 * u), 0.03 * u, shape))]  # fmt: skip
    parts += [("nose", _disk((top + 0.72 * u, cx), 0.07 * u, shape)),
              ("mouth", _limb((top + 0.9 * u, cx - 0.15 * u), (top + 0.9 * u, cx + 0.15 * u), 0.04 * u, shape))]  # fmt: skip
    return parts


def _add_parts(scene: Scene, obj: SceneObject, parts: list[tuple[str, np.ndarray]], regions: dict[str, int]) -> None:
    """Paint an object's parts (its instance mask is their union), front to back as listed."""
    scene.objects.append(obj)
    k = len(scene.objects)
    union = np.zeros(scene.label_map.shape, dtype=bool)
    for _, mask in parts:
        union |= mask
    rows, cols = np.nonzero(union)
    if rows.size == 0:
        return
    normals = _bulge(union.shape, (rows.min(), cols.min(), rows.max(), cols.max()))
    for name, mask in parts:
        if name not in obj.parts:
            scene.n_parts += 1  # ids are never reused, even for parts that end up hidden
            obj.parts[name] = scene.n_parts
        scene.paint(mask, CONTEXT_CLASSES[obj.name], normals[mask], regions.get(name))
        scene.instances[mask] = k
        scene.part_ids[mask] = obj.parts[name]


def _add_person(scene: Scene, rng: np.random.Generator, annotated: bool) -> None:
    h, w = scene.label_map.shape
    u = h * rng.uniform(0.45, 0.8) / 8
    feet, cx = h * rng.uniform(0.88, 1.02), w * rng.uniform(0.2, 0.8)
    parts = _person_parts(feet - 8 * u, cx, u, rng, (h, w))
    _add_parts(scene, SceneObject("person", 15, annotated=annotated), parts, PART_REGION)


def _add_object(scene: Scene, rng: np.random.Generator, name: str, horizon: int) -> None:
    """A VOC object: animals as body + head (with Pascal-Part's "torso" / "head"), others as a box,
    an ellipse or (aeroplanes, boats) a triangle-topped hull; no parts for the latter."""
    h, w = scene.label_map.shape
    cy, cx = rng.uniform(max(horizon, h * 0.35), h * 0.9), rng.uniform(0.15, 0.85) * w
    ry, rx = h * rng.uniform(0.1, 0.22), w * rng.uniform(0.1, 0.22)
    body = np.zeros((h, w), dtype=bool)
    if name in ANIMALS:
        body[draw.ellipse(cy, cx, ry * 0.7, rx, shape=(h, w))] = True
        side = rng.choice([-1, 1])
        head = _disk((cy - ry * 0.6, cx + side * rx * 0.9), min(rx, ry) * 0.45, (h, w))
        _add_parts(scene, SceneObject(name, VOC_CLASS_INDEX[name]), [("torso", body), ("head", head)], {})
        return
    shape = rng.choice(["box", "ellipse", "hull"] if name in ("aeroplane", "boat") else ["box", "ellipse"])
    if shape == "box":
        body[draw.rectangle((cy - ry, cx - rx), (cy + ry, cx + rx), shape=(h, w))] = True
    elif shape == "ellipse":
        body[draw.ellipse(cy, cx, ry, rx, shape=(h, w))] = True
    else:
        body[draw.polygon([cy + ry, cy + ry, cy - ry, cy], [cx - rx, cx + rx, cx + rx * 0.2, cx - rx], (h, w))] = True
    _add_parts(scene, SceneObject(name, VOC_CLASS_INDEX[name], annotated=False), [("body", body)], {})


def _empty_scene(h: int, w: int, label_dtype: type, depth: bool) -> Scene:
    return Scene(
        label_map=np.zeros((h, w), dtype=label_dtype),
        normals=np.tile(FRONT, (h, w, 1)),
        regions=np.zeros((h, w), dtype=np.int64),
        instances=np.zeros((h, w), dtype=np.int64),
        part_ids=np.zeros((h, w), dtype=np.int64),
        depth=np.zeros((h, w)) if depth else None,
    )


def pascal_scene(rng: np.random.Generator, h: int, w: int, people: str) -> Scene:
    """An indoor (wall, floor, window) or outdoor (sky, ground, trees) scene with 1-2 VOC objects and,
    by `people` ("parts", "unannotated", "none"), one or two people drawn last (in front)."""
    scene = _empty_scene(h, w, np.uint16, depth=False)
    horizon = int(h * rng.uniform(0.4, 0.6))
    c = CONTEXT_CLASSES
    indoor = rng.random() < 0.5
    top, bottom = (c["wall"], c["floor"]) if indoor else (c["sky"], c[str(rng.choice(["grass", "ground", "road"]))])
    scene.paint(np.s_[:horizon], top, FRONT)
    scene.paint(np.s_[horizon:], bottom, UP)
    band = np.zeros((h, w), dtype=bool)
    if indoor:  # a window or a door on the wall
        r0, c0 = int(horizon * rng.uniform(0.1, 0.4)), int(w * rng.uniform(0.05, 0.6))
        band[r0 : horizon - 1, c0 : c0 + max(2, w // 5)] = True
        scene.paint(band, c[str(rng.choice(["window", "door"]))], FRONT)
    else:  # trees or a building standing on the horizon
        band[draw.ellipse(horizon, rng.uniform(0, w), h * 0.2, w * rng.uniform(0.15, 0.35), shape=(h, w))] = True
        band[horizon:] = False
        scene.paint(band, c[str(rng.choice(["tree", "building"]))], FRONT)
    for name in rng.choice(INDOOR_OBJECTS if indoor else OUTDOOR_OBJECTS, size=int(rng.integers(1, 3)), replace=False):
        _add_object(scene, rng, str(name), horizon)
    for _ in range(0 if people == "none" else int(rng.integers(1, 3))):
        _add_person(scene, rng, annotated=people == "parts")
    return scene


def nyud_scene(rng: np.random.Generator, h: int, w: int) -> Scene:
    """A room seen by a level camera: floor and ceiling planes up to a back wall, a framed picture or
    window, and 1-3 pieces of furniture as boxes standing on the floor; depth and normals consistent."""
    scene = _empty_scene(h, w, np.uint8, depth=True)
    f, y0 = 0.9 * w, h * rng.uniform(0.38, 0.5)  # focal length (px), horizon row
    cam, ceiling, back = rng.uniform(1.1, 1.5), rng.uniform(2.4, 3.0), rng.uniform(3.5, 6.0)  # metres
    rows = np.arange(h, dtype=np.float64)[:, None] + 0.5
    with np.errstate(divide="ignore"):
        floor_z, ceil_z = cam * f / (rows - y0), (ceiling - cam) * f / (y0 - rows)
    scene.paint(np.ones((h, w), dtype=bool), NYU40["wall"], FRONT)
    scene.depth[:] = back
    for z, label, normal in ((floor_z, "floor", UP), (ceil_z, "ceiling", DOWN)):
        mask = np.broadcast_to((z > 0) & (z < back), (h, w))
        scene.paint(mask, NYU40[label], normal)
        scene.depth[mask] = np.broadcast_to(z, (h, w))[mask]
    r0, c0 = int(y0 * rng.uniform(0.3, 0.6)), int(w * rng.uniform(0.1, 0.6))
    frame = np.zeros((h, w), dtype=bool)
    frame[r0 : int(y0), c0 : c0 + w // 4] = True
    scene.paint(frame & (scene.label_map == NYU40["wall"]), NYU40[str(rng.choice(["picture", "window"]))], FRONT)
    furniture = [(str(n), rng.uniform(1.5, back - 0.3)) for n in rng.choice(FURNITURE, int(rng.integers(1, 4)))]
    for name, z in sorted(furniture, key=lambda t: -t[1]):  # far to near
        height, width = rng.uniform(0.4, 1.6), rng.uniform(0.5, 1.8)
        xc = rng.uniform(0.1, 0.9) * w
        bottom, top = y0 + cam * f / z, y0 + (cam - height) * f / z
        cols = np.s_[max(0, int(xc - width * f / (2 * z))) : int(xc + width * f / (2 * z))]
        front = np.zeros((h, w), dtype=bool)
        front[max(0, int(top)) : int(bottom), cols] = True
        scene.paint(front, NYU40[name], FRONT)
        scene.depth[front] = z
        if height < cam:  # the top surface is seen from above, receding to z + 0.5 m
            lid = np.zeros((h, w), dtype=bool)
            lid[max(0, int(y0 + (cam - height) * f / (z + 0.5))) : max(0, int(top)), cols] = True
            scene.paint(lid, NYU40[name], UP)
            lid_z = np.clip((cam - height) * f / np.maximum(rows - y0, 1e-3), z, z + 0.5)
            scene.depth[lid] = np.broadcast_to(lid_z, (h, w))[lid]
    return scene


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _encode_normals(normals: np.ndarray) -> np.ndarray:
    """Unit vectors (H, W, 3) -> the PNG convention v = round(255 (n + 1) / 2)."""
    return np.rint((normals + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def _render(scene: Scene, rng: np.random.Generator, palette: dict[int, np.ndarray]) -> np.ndarray:
    """RGB uint8 image: a colour per region, shaded by the normals (light from the upper left) and
    darkened with distance where there is depth, plus texture noise."""
    h, w = scene.regions.shape
    base = np.stack([palette[int(r)] for r in range(int(scene.regions.max()) + 1)])[scene.regions]
    light = np.array([-0.35, 0.5, 0.8]) / np.linalg.norm([-0.35, 0.5, 0.8])
    shade = 0.55 + 0.45 * np.clip(scene.normals @ light, 0, 1)
    if scene.depth is not None:
        shade = shade * np.clip(1.15 - scene.depth / 12.0, 0.5, 1.0)
    yy = np.linspace(0, 1, h)[:, None]
    texture = rng.normal(0, 7, size=(h, w, 3)) + 6 * np.sin(np.arange(w) / 3.0 + rng.uniform(0, 6))[None, :, None]
    image = base * shade[..., None] * (1.0 - 0.1 * yy[..., None]) + texture
    return np.clip(image, 0, 255).astype(np.uint8)


def _palette(seed: int, fixed: dict[int, tuple[int, int, int]]) -> dict[int, np.ndarray]:
    """A random colour per region id, with natural colours for skies, grass, walls, skin..."""
    rng = np.random.default_rng([seed, 7])
    palette = {r: rng.integers(30, 230, size=3).astype(np.float64) for r in range(2048)}
    palette.update({k: np.asarray(v, dtype=np.float64) for k, v in fixed.items()})
    return palette


def _savemat(path: Path, mdict: dict, **kwargs) -> None:
    """scipy.io.savemat with a fixed header text: scipy writes the time of writing into the 116-byte text of
    the MAT 5 header, so that the same seed would not write the same bytes. Readers use only the header's
    last 8 bytes (subsystem offset, version, byte order), which are kept."""
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, mdict, **kwargs)
    data = bytearray(buffer.getvalue())
    data[:116] = b"MATLAB 5.0 MAT-file, written by sak.data.fixtures".ljust(116, b" ")
    path.write_bytes(bytes(data))


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


# ---------------------------------------------------------------------------------------------
# PASCAL-Context
# ---------------------------------------------------------------------------------------------
def _objects_struct(scene: Scene) -> np.ndarray:
    """The Pascal-Part `objects` struct array (1, N): class, class_ind, mask, parts(part_name, mask)."""
    objects = np.empty(
        (1, len(scene.objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    )
    for k, obj in enumerate(scene.objects):
        mask = (scene.instances == k + 1).astype(np.uint8)
        names = [n for n, i in obj.parts.items() if (scene.part_ids == i).any()] if obj.annotated else []
        if names:
            parts = np.empty((1, len(names)), dtype=[("part_name", "O"), ("mask", "O")])
            for j, name in enumerate(names):
                parts[0, j] = (name, (scene.part_ids == obj.parts[name]).astype(np.uint8))
        else:
            parts = np.zeros((0, 0))  # MATLAB's empty [] for an object without part annotations
        objects[0, k] = (obj.name, np.array([[float(obj.voc_index)]]), mask, parts)
    return objects


def _saliency(scene: Scene) -> np.ndarray:
    """Distilled saliency: the foreground objects, blurred as a network's soft output would be; uint8."""
    fg = (scene.instances > 0).astype(np.float64)
    return np.rint(255 * ndimage.gaussian_filter(fg, 1.2)).clip(0, 255).astype(np.uint8)


def _semseg(scene: Scene, void_border: bool) -> np.ndarray:
    """21-class VOC labels from the context labels; optionally VOC's 255 band on object outlines."""
    lut = np.zeros(int(scene.label_map.max()) + 1, dtype=np.uint8)
    for voc, context in enumerate(VOC_CONTEXT_IDS):
        if context and context < lut.size:
            lut[context] = voc
    semseg = lut[scene.label_map]
    if void_border:
        fg = scene.instances > 0
        semseg[fg & ~ndimage.binary_erosion(fg)] = 255
    return semseg


def write_pascal_context(
    root: str | Path, n_train: int = 4, n_val: int = 2, size: int | tuple[int, int] = (96, 128), seed: int = 0
) -> Path:
    """Write a PASCAL_MT-layout dataset of `n_train` + `n_val` images under `root`; returns `root`.

    Image sizes vary between 3/4 of `size` (H, W) and `size`. Within each split, images 0, 3, 6, ... hold a
    person with part annotations, images 1, 4, ... hold no person, the others are drawn at random (people
    with or without part annotations, or none).
    """
    root = Path(root)
    H, W = _hw(size)
    c = CONTEXT_CLASSES
    palette = _palette(seed, {c["sky"]: (130, 175, 235), c["grass"]: (70, 140, 60), c["wall"]: (205, 195, 175),
                              c["floor"]: (150, 110, 80), c["road"]: (110, 110, 115), c["ground"]: (140, 120, 90),
                              c["tree"]: (40, 100, 45), SKIN: (224, 172, 140), HAIR: (60, 40, 30)})  # fmt: skip
    parts_index: dict[str, dict[str, list[int]]] = {"train": {}, "val": {}}
    split_ids: dict[str, list[str]] = {"train": [], "val": []}
    for n, (split, k) in enumerate([("train", k) for k in range(n_train)] + [("val", k) for k in range(n_val)]):
        rng = np.random.default_rng([seed, n])
        sample_id = f"{2008 + n % 3}_{n + 1:06d}"
        h, w = int(rng.integers(3 * H // 4, H + 1)), int(rng.integers(3 * W // 4, W + 1))
        people = "parts" if k % 3 == 0 else "none" if k % 3 == 1 else str(rng.choice(["parts", "unannotated", "none"]))
        scene = pascal_scene(rng, h, w, people)
        image = _render(scene, rng, palette)
        path = root / "JPEGImages" / f"{sample_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path, quality=90)
        _write_png(root / "semseg" / "pascal-context" / f"{sample_id}.png", _semseg(scene, void_border=n % 2 == 0))
        _write_png(root / "sal_distill" / f"{sample_id}.png", _saliency(scene))
        _write_png(root / "normals_distill" / f"{sample_id}.png", _encode_normals(scene.normals))
        (root / "pascal-context" / "trainval").mkdir(parents=True, exist_ok=True)
        _savemat(root / "pascal-context" / "trainval" / f"{sample_id}.mat", {"LabelMap": scene.label_map})
        (root / "human_parts").mkdir(parents=True, exist_ok=True)
        anno = {"imname": f"{sample_id}.jpg", "objects": _objects_struct(scene)}
        _savemat(root / "human_parts" / f"{sample_id}.mat", {"anno": anno}, do_compression=True)
        parts_index[split][sample_id] = [
            o.voc_index if (scene.instances == j + 1).any() else -1 for j, o in enumerate(scene.objects)
        ]
        split_ids[split].append(sample_id)
    for split, ids in split_ids.items():
        _write_lines(root / "ImageSets" / "Context" / f"{split}.txt", ids)
        entries = ",\n".join(f'\t"{i}": {json.dumps(parts_index[split][i])}' for i in ids)
        (root / "ImageSets" / "Parts").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Parts" / f"{split}.txt").write_text("{\n" + entries + "\n}\n")
    (root / "json").mkdir(parents=True, exist_ok=True)
    (root / "json" / "context_classes.json").write_text(json.dumps(CONTEXT_CLASSES))
    (root / "json" / "nyu_classes.json").write_text(json.dumps(NYU_FINE_CLASSES))
    (root / "json" / "pascal_part.json").write_text(json.dumps({"15": PERSON_PART_IDS}, indent=1))
    return root


# ---------------------------------------------------------------------------------------------
# NYUD-v2
# ---------------------------------------------------------------------------------------------
def _boundaries(labels: np.ndarray) -> np.ndarray:
    """0 / 255 uint8 map of the pixels whose right or lower neighbour has another label."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge.astype(np.uint8) * 255


def write_nyud(
    root: str | Path, n_train: int = 4, n_val: int = 2, size: int | tuple[int, int] = (96, 128), seed: int = 0
) -> Path:
    """Write a NYUD_MT-layout dataset (images PNG, segmentation PNG 0..40, normals PNG, edge PNG, depth
    .npy in metres, gt_sets) of `n_train` + `n_val` indoor scenes of `size` (H, W); returns `root`."""
    root = Path(root)
    h, w = _hw(size)
    palette = _palette(
        seed + 1, {NYU40["wall"]: (215, 210, 195), NYU40["floor"]: (140, 100, 70), NYU40["ceiling"]: (235, 235, 230)}
    )
    split_ids: dict[str, list[str]] = {"train": [], "val": []}
    for n, split in enumerate(["train"] * n_train + ["val"] * n_val):
        rng = np.random.default_rng([seed, 10_000 + n])
        sample_id = f"{n + 1:04d}"
        scene = nyud_scene(rng, h, w)
        segmentation = scene.label_map.astype(np.uint8)
        for _ in range(int(rng.integers(0, 3))):  # a few unlabelled (0) blobs, as in the real annotations
            rr, cc = draw.disk((rng.uniform(0, h), rng.uniform(0, w)), max(1.0, h / 20), shape=(h, w))
            segmentation[rr, cc] = 0
        _write_png(root / "images" / f"{sample_id}.png", _render(scene, rng, palette))
        _write_png(root / "segmentation" / f"{sample_id}.png", segmentation)
        _write_png(root / "normals" / f"{sample_id}.png", _encode_normals(scene.normals))
        _write_png(root / "edge" / f"{sample_id}.png", _boundaries(scene.label_map))
        (root / "depth").mkdir(parents=True, exist_ok=True)
        np.save(root / "depth" / f"{sample_id}.npy", scene.depth.astype(np.float32))
        split_ids[split].append(sample_id)
    for split, ids in split_ids.items():
        _write_lines(root / "gt_sets" / f"{split}.txt", ids)
    return root


WRITERS = {"pascal_context": write_pascal_context, "nyud": write_nyud}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=["pascal_context", "nyud"])
    parser.add_argument("root")
    parser.add_argument("--train", type=int, default=8)
    parser.add_argument("--val", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=2, default=[96, 128], metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = WRITERS[args.dataset](args.root, args.train, args.val, tuple(args.size), args.seed)
    print(f"wrote a {args.dataset} fixture ({args.train} train, {args.val} val) to {out}")


if __name__ == "__main__":
    main()
