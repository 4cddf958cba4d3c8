"""The pieces of the boundary benchmark against hand values and independent references."""

import math

import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import thin as skimage_thin

from sak.metrics.boundary import (
    conv_tri,
    disc_offsets,
    edge_nms,
    edge_orientation,
    match_count,
    seg2bmap,
    thin,
)


def test_conv_tri_by_hand():
    image = np.zeros((5, 5), dtype=np.float32)
    image[2, 2] = 1
    out = conv_tri(image, 1)  # [1 2 1] / 4 in each direction
    assert out[1:4, 1:4] == pytest.approx(np.outer([1, 2, 1], [1, 2, 1]) / 16)
    corner = np.zeros((3, 3), dtype=np.float32)
    corner[0, 0] = 1
    assert conv_tri(corner, 1)[0, 0] == pytest.approx(9 / 16)  # symmetric padding repeats the edge


def test_orientation_is_the_boundary_normal():
    image = np.zeros((21, 21), dtype=np.float32)
    image[:, 10] = 1  # vertical line: normal along x
    assert edge_orientation(image)[5:16, 10] == pytest.approx(0.0, abs=1e-3)
    diagonal = np.eye(21, dtype=np.float32)  # y = x in image coordinates: normal (1, -1)
    assert edge_orientation(diagonal)[9:12, 9:12] == pytest.approx(np.full((3, 3), 3 * math.pi / 4), abs=1e-2)
    assert edge_orientation(diagonal[:, ::-1].copy())[9:12, 9:12] == pytest.approx(
        np.full((3, 3), math.pi / 4), abs=1e-2
    )
    # the toolbox's formula has sign(-Oxy) = 0 on an exactly horizontal line, so O = 0 there too
    assert edge_orientation(image.T.copy())[10, 5:16] == pytest.approx(0.0)


def _nms_loop(e0, o, r, s, m):
    """The MEX's loops, pixel by pixel."""
    h, w = e0.shape

    def interp(x, y):
        x, y = min(max(x, 0), w - 1.001), min(max(y, 0), h - 1.001)
        x0, y0 = int(x), int(y)
        dx0, dy0 = x - x0, y - y0
        return (
            e0[y0, x0] * (1 - dx0) * (1 - dy0)
            + e0[y0, x0 + 1] * dx0 * (1 - dy0)
            + e0[y0 + 1, x0] * (1 - dx0) * dy0
            + e0[y0 + 1, x0 + 1] * dx0 * dy0
        )

    out = e0.astype(np.float64).copy()
    for y in range(h):
        for x in range(w):
            e = e0[y, x]
            if not e:
                continue
            for d in [*range(-r, 0), *range(1, r + 1)]:
                if e * m < interp(x + d * math.cos(o[y, x]), y + d * math.sin(o[y, x])):
                    out[y, x] = 0
                    break
    s = min(s, w // 2, h // 2)
    for x in range(s):
        out[:, x] *= x / s
        out[:, w - 1 - x] *= x / s
    for y in range(s):
        out[y, :] *= y / s
        out[h - 1 - y, :] *= y / s
    return out


def test_nms_matches_a_pixel_loop():
    rng = np.random.default_rng(0)
    edges = conv_tri(ndimage.gaussian_filter(rng.random((24, 30)), 2).astype(np.float32), 1)
    orientation = edge_orientation(edges)
    got = edge_nms(edges, orientation, r=2, s=3, m=1.01)
    want = _nms_loop(edges, orientation, 2, 3, 1.01)
    kept = got > 0
    assert 0 < kept.sum() < kept.size
    # float32 vs float64 may flip near-ties; allow a handful
    assert (kept != (want > 0)).sum() <= 2
    assert got[kept & (want > 0)] == pytest.approx(want[kept & (want > 0)], rel=1e-5)


def test_thin_equals_skimage():
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = rng.integers(3, 40, size=2)
        blobs = ndimage.binary_dilation(rng.random((h, w)) > 0.95, iterations=int(rng.integers(1, 4)))
        noise = rng.random((h, w)) > rng.uniform(0.3, 0.8)
        for image in (blobs, noise):
            assert np.array_equal(thin(image), skimage_thin(image))


def test_seg2bmap_by_hand():
    labels = np.array([[1, 1, 2], [1, 1, 2], [3, 3, 3]])
    expected = np.array([[0, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=bool)
    assert np.array_equal(seg2bmap(labels), expected)


def test_seg2bmap_ignores_seism_relabelling_of_connected_regions():
    """SEISM scores seg2bmap(relabel(labels)); relabel numbers the 4-connected regions, which cannot
    change seg2bmap, so sak applies seg2bmap to the label map as it is."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 3, size=rng.integers(2, 12, size=2))
        regions = np.zeros(labels.shape, dtype=np.int64)
        for value in np.unique(labels):
            found = ndimage.label(labels == value)[0]  # 4-connectivity
            regions[found > 0] = found[found > 0] + regions.max()
        assert np.array_equal(seg2bmap(regions), seg2bmap(labels))


def test_disc_offsets():
    assert len(disc_offsets(1.0)) == 5
    assert len(disc_offsets(0.0075 * math.hypot(200, 200))) == 13  # 2.12 px: up to (2, 0) and (1, 1)


def test_match_count_is_one_to_one_and_maximum():
    # greedy p0-g0 would strand g1 and p1; the maximum pairs p0-g1, p1-g0
    rows, cols = np.array([0, 0, 1]), np.array([0, 1, 0])
    assert match_count(rows, cols, 2, 2) == 2
    assert match_count(np.array([0, 1, 2]), np.array([0, 0, 0]), 3, 1) == 1  # three preds, one gt pixel
    assert match_count(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 4, 4) == 0


def test_match_count_equals_networkx_hopcroft_karp():
    nx = pytest.importorskip("networkx")
    rng = np.random.default_rng(0)
    for _ in range(20):
        n_p, n_g = rng.integers(1, 40, size=2)
        dense = rng.random((n_p, n_g)) < rng.uniform(0.02, 0.3)
        rows, cols = np.nonzero(dense)  # sorted by (row, col)
        graph = nx.Graph()
        graph.add_nodes_from(range(n_p))
        graph.add_edges_from((int(r), n_p + int(c)) for r, c in zip(rows, cols, strict=True))
        expected = len(nx.bipartite.hopcroft_karp_matching(graph, top_nodes=range(n_p))) // 2
        assert match_count(rows, cols, n_p, n_g) == expected
