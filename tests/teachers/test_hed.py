"""The offline HED teacher: the torch port against an independent NumPy computation from the HDF5
file, edge behaviour on a synthetic and a real image, and the teacher contract."""

import h5py
import numpy as np
import torch
from scipy.signal import correlate

from sak.teachers import TeacherSpec, create_teacher
from sak.teachers.hed import package_weights


def numpy_side1(x_bgr: np.ndarray, path) -> np.ndarray:
    """Side output 1 (block 1: two 3x3 'same' convs + ReLU, then the 1x1 dsn1) straight from the
    Keras kernels (H, W, in, out), by cross-correlation: no torch, no weight conversion code shared."""
    with h5py.File(path, "r") as f:
        layers = [
            (f[f"block1/layers/{n}/vars/0"][()], f[f"block1/layers/{n}/vars/1"][()]) for n in ("conv2d", "conv2d_1")
        ]
        side_k, side_b = f["dsn1/vars/0"][()], f["dsn1/vars/1"][()]
    h = x_bgr  # (H, W, C)
    for kernel, bias in layers:
        padded = np.pad(h, ((1, 1), (1, 1), (0, 0)))
        out = np.stack([sum(correlate(padded[..., c], kernel[..., c, o], mode="valid") for c in range(h.shape[-1]))
                        for o in range(kernel.shape[-1])], axis=-1)  # fmt: skip
        h = np.maximum(out + bias, 0)
    return (h @ side_k[0, 0])[..., 0] + side_b[0]


def test_port_matches_an_independent_numpy_computation_of_the_keras_weights():
    teacher = create_teacher("hed")
    rng = np.random.default_rng(0)
    x = rng.uniform(-120, 130, size=(12, 12, 3)).astype(np.float32)  # a BGR mean-subtracted crop
    expected = numpy_side1(x.astype(np.float64), package_weights())
    with torch.no_grad():
        feats = teacher.net.trunk(torch.from_numpy(x).permute(2, 0, 1)[None])
        ours = teacher.net.sides[0](feats[0])[0, 0].numpy()
    assert np.abs(ours - expected).max() < 1e-3 * max(1.0, np.abs(expected).max())


def test_edges_are_on_the_border_of_a_square_not_inside_or_outside():
    image = torch.full((1, 3, 160, 160), 40, dtype=torch.uint8)
    image[:, :, 40:120, 40:120] = 220
    teacher = create_teacher("hed", spec=TeacherSpec(image_size=160))
    edges = teacher.edges(image)[0, 0]
    border = torch.cat([edges[38:42, 45:115].flatten(), edges[45:115, 118:122].flatten()])
    assert border.mean() > 0.5
    assert edges[70:90, 70:90].mean() < 0.1 and edges[5:20, 5:20].mean() < 0.1


def test_edges_of_a_real_photo_follow_image_gradients():
    from skimage.data import coffee
    from skimage.filters import sobel
    from skimage.transform import resize

    teacher = create_teacher("hed", spec=TeacherSpec(image_size=200))
    photo = torch.from_numpy(coffee()).permute(2, 0, 1)[None]
    edges = teacher.edges(photo)[0, 0].numpy()
    grad = sobel(resize(coffee().mean(-1) / 255.0, edges.shape, anti_aliasing=True))
    assert np.corrcoef(edges.ravel(), grad.ravel())[0, 1] > 0.5


def test_teacher_contract():
    teacher = create_teacher("hed")
    assert teacher.meta.num_params == 14_716_171
    assert teacher.level_dims == (128, 256, 512, 512) and teacher.level_strides == (2, 4, 8, 16)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    out = teacher.encode(torch.randint(0, 255, (1, 3, 90, 70), dtype=torch.uint8))
    assert [t.shape[1:] for t in out.levels] == [(128, 160, 160), (256, 80, 80), (512, 40, 40), (512, 20, 20)]
    assert out.summary is None
