"""The image-level pieces of the boundary benchmark, in NumPy / SciPy (no MATLAB, no MEX).

What the multi-task repositories run (SAK's `edge_evaluation.py --nms`, then SEISM; MTI-Net's
`eval_edge.py` skips step 1):
1. `nms_process.m`: E = convTri(pred, 1); orientation from the second derivatives of convTri(E, 4);
   `edgesNmsMex(E, O, r=4, s=5, m=1.01)` (Piotr Dollar's Structured Edge toolbox); saved as
   `uint8(E * 255)` (MATLAB rounds).
2. SEISM reads the PNG as k / 255 and binarises it with `>=` at each parameter 0.01 .. 0.99 (the
   parameter file is written with '%.2f', so thresholds are j / 100 exactly).
3. `eval_cont` -> `edgesEvalImg`: the binary map is thinned (`bwmorph(..., 'thin', inf)`), and
   `correspondPixels` matches it one-to-one to the ground-truth boundaries within
   maxDist * image diagonal (0.0075 BSDS / PASCAL, 0.011 NYUD), counting matched ground-truth pixels
   (cntR), ground-truth pixels (sumR), matched predicted pixels (cntP) and predicted pixels (sumP).

Each step here is an independent implementation of the published algorithm: `conv_tri` (symmetric
padding), `edge_orientation`, `edge_nms` (float32, bilinear interpolation clamped as in the MEX),
`thin` (Guo & Hall's two-subiteration parallel thinning, the algorithm of MATLAB's `bwmorph 'thin'`
and skimage's `thin`, here on the sparse set of foreground pixels) and `match_count`. BSDS matches with
a min-cost perfect matching (CSA) whose outlier cost dwarfs every real edge, so it keeps as many real
matches as its sparse outlier graph allows; here the count is a maximum-cardinality bipartite matching
over the pairs within the radius, computed as a unit-capacity maximum flow (Dinic's algorithm in
`scipy.sparse.csgraph.maximum_flow`; `maximum_bipartite_matching` is not used because its
Hopcroft-Karp can take exponential time on such layered graphs, scipy issue #26147: minutes on one
512 x 512 boundary map).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow

# 8-neighbours (dy, dx) in the order x1..x8 of Guo & Hall: E, NE, N, NW, W, SW, S, SE.
NEIGHBOURS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


# -------------------------------------------------------------------------------------------------
# non-maximum suppression (Structured Edge toolbox conventions)
# -------------------------------------------------------------------------------------------------
def conv_tri(image: np.ndarray, r: int) -> np.ndarray:
    """Separable triangle filter [1 .. r+1 .. 1] / (r+1)^2 with symmetric padding (convTri, integer r)."""
    f = np.concatenate([np.arange(1, r + 2), np.arange(r, 0, -1)]).astype(np.float32) / np.float32((r + 1) ** 2)
    out = ndimage.correlate1d(image, f, axis=0, mode="reflect")
    return ndimage.correlate1d(out, f, axis=1, mode="reflect")


def edge_orientation(edges: np.ndarray) -> np.ndarray:
    """Boundary normal angle in [0, pi) from the second derivatives of convTri(edges, 4)."""
    oy, ox = np.gradient(conv_tri(edges, 4))
    oxx = np.gradient(ox, axis=1)
    oxy, oyy = np.gradient(oy, axis=1), np.gradient(oy, axis=0)
    return np.mod(np.arctan(oyy * np.sign(-oxy) / (oxx + np.float32(1e-5))), np.float32(np.pi))


def edge_nms(
    edges: np.ndarray, orientation: np.ndarray, r: int = 4, s: int = 5, m: float = 1.01, floor: float = 0.0
) -> np.ndarray:
    """Keep a pixel when (its value x m) is not below the bilinearly interpolated values at distances
    1..r on both sides along its orientation; then fade the s-pixel border linearly to 0. Pixels below
    `floor` are set to 0 without being examined (a shortcut for callers that threshold above it)."""
    e0 = edges.astype(np.float32)
    h, w = e0.shape
    ys, xs = np.nonzero(e0 >= max(floor, np.finfo(np.float32).tiny))
    theta = orientation[ys, xs]
    cos_o, sin_o = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    fys, fxs = ys.astype(np.float32), xs.astype(np.float32)
    scaled = e0[ys, xs] * np.float32(m)
    suppressed = np.zeros(len(ys), dtype=bool)
    for d in (*range(-r, 0), *range(1, r + 1)):
        value = _interp(e0, fxs + np.float32(d) * cos_o, fys + np.float32(d) * sin_o)
        suppressed |= scaled < value
    out = np.zeros((h, w), dtype=np.float32)
    out[ys[~suppressed], xs[~suppressed]] = e0[ys[~suppressed], xs[~suppressed]]
    s = min(s, w // 2, h // 2)
    for x in range(s):
        fade = np.float32(x / s)
        out[:, x] *= fade
        out[:, w - 1 - x] *= fade
    for y in range(s):
        fade = np.float32(y / s)
        out[y, :] *= fade
        out[h - 1 - y, :] *= fade
    return out


def _interp(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear interpolation at (x, y), clamped to [0, w - 1.001] x [0, h - 1.001] as the MEX does."""
    h, w = image.shape
    x = np.clip(x, np.float32(0), np.float32(w - 1.001))
    y = np.clip(y, np.float32(0), np.float32(h - 1.001))
    x0, y0 = x.astype(np.int64), y.astype(np.int64)
    dx0, dy0 = x - x0, y - y0
    dx1, dy1 = 1 - dx0, 1 - dy0
    flat = image.reshape(-1)
    i00 = y0 * w + x0
    return flat[i00] * dx1 * dy1 + flat[i00 + 1] * dx0 * dy1 + flat[i00 + w] * dx1 * dy0 + flat[i00 + w + 1] * dx0 * dy0


def nms_edges(pred: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """The multi-task repositories' `nms_process`: convTri(pred, 1), orientation, NMS(r=4, s=5, m=1.01)."""
    edges = conv_tri(pred.astype(np.float32), 1)
    if min(edges.shape) < 2:
        return edges
    return edge_nms(edges, edge_orientation(edges), floor=floor)


# -------------------------------------------------------------------------------------------------
# thinning (Guo & Hall 1989, algorithm A1; Lam, Lee & Suen 1992)
# -------------------------------------------------------------------------------------------------
def _thinning_tables() -> tuple[np.ndarray, np.ndarray]:
    """Deletion look-up tables of the two subiterations, indexed by the 8-bit code of x1..x8."""
    code = np.arange(256)
    x = [(code >> k) & 1 for k in range(8)]  # x[k] is neighbour x_{k+1}
    crossing = sum(((1 - x[2 * i]) & (x[2 * i + 1] | x[(2 * i + 2) % 8])) for i in range(4))
    n1 = sum(x[2 * k] | x[2 * k + 1] for k in range(4))
    n2 = sum(x[2 * k + 1] | x[(2 * k + 2) % 8] for k in range(4))
    common = (crossing == 1) & (np.minimum(n1, n2) >= 2) & (np.minimum(n1, n2) <= 3)
    first = ((x[1] | x[2] | (1 - x[7])) & x[0]) == 0
    second = ((x[5] | x[6] | (1 - x[3])) & x[4]) == 0
    return common & first, common & second


THINNING_TABLES = _thinning_tables()
_NEIGHBOUR_BIT = np.array([1 << k for k in range(8)], dtype=np.uint8)


def thin(mask: np.ndarray) -> np.ndarray:
    """Thin a binary map to one-pixel-wide, 8-connected lines until nothing changes (bwmorph 'thin', inf).
    Pixels outside the image count as background."""
    h, w = mask.shape
    canvas = np.zeros((h + 2, w + 2), dtype=bool)
    canvas[1:-1, 1:-1] = mask
    thin_points(canvas, *np.nonzero(canvas))
    return canvas[1:-1, 1:-1].copy()


def thin_points(canvas: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Thin the foreground pixels (ys, xs) of a zero-bordered boolean `canvas` in place; returns which of
    the given pixels survive. `canvas` must hold exactly these pixels and a one-pixel empty border.

    Same result as re-testing every pixel in every subiteration: a pixel is re-tested only when one of
    its neighbours was deleted since its last test with that subiteration's table."""
    wp = canvas.shape[1]
    flat = canvas.reshape(-1)
    pos = ys.astype(np.int64) * wp + xs
    offsets = np.array([dy * wp + dx for dy, dx in NEIGHBOURS], dtype=np.int64)
    point_at = np.full(flat.size, -1, dtype=np.int64)
    point_at[pos] = np.arange(len(pos))
    alive = np.ones(len(pos), dtype=bool)
    dirty = [np.ones(len(pos), dtype=bool), np.ones(len(pos), dtype=bool)]
    quiet, t = 0, 0  # subiterations in a row that deleted nothing; which table is next
    while quiet < 2:
        idx = np.flatnonzero(dirty[t])
        dirty[t][idx] = False
        p = pos[idx]
        code = np.zeros(len(idx), dtype=np.uint8)
        for bit, off in zip(_NEIGHBOUR_BIT, offsets, strict=True):
            code |= flat[p + off].view(np.uint8) * bit
        delete = THINNING_TABLES[t][code]
        if delete.any():
            gone = p[delete]
            flat[gone] = False
            alive[idx[delete]] = False
            touched = point_at[(gone[:, None] + offsets[None]).ravel()]
            touched = touched[touched >= 0]
            touched = touched[alive[touched]]
            dirty[0][touched] = dirty[1][touched] = True
            quiet = 0
        else:
            quiet += 1
        t = 1 - t
    return alive


# -------------------------------------------------------------------------------------------------
# ground truth and matching
# -------------------------------------------------------------------------------------------------
def seg2bmap(labels: np.ndarray) -> np.ndarray:
    """BSDS `seg2bmap` at the image's own size: a pixel is a boundary when its label differs from its
    east, south or south-east neighbour (last row: east only; last column: south only; the corner never).
    SEISM scores PASCAL-Context against seg2bmap of the context `LabelMap`, and so does `sak eval`
    (`sak.data.pascal_context.seism_boundaries`)."""
    seg = np.asarray(labels)
    b = np.zeros(seg.shape, dtype=bool)
    core = seg[:-1, :-1]
    b[:-1, :-1] = (core != seg[:-1, 1:]) | (core != seg[1:, :-1]) | (core != seg[1:, 1:])
    b[-1, :-1] = seg[-1, :-1] != seg[-1, 1:]
    b[:-1, -1] = seg[:-1, -1] != seg[1:, -1]
    return b


def match_radius(shape: tuple[int, int], tolerance: float) -> float:
    """correspondPixels' maximum distance in pixels: tolerance x image diagonal."""
    return tolerance * math.hypot(*shape)


def disc_offsets(radius: float) -> np.ndarray:
    """(K, 2) integer (dy, dx) with dy^2 + dx^2 <= radius^2."""
    r = math.ceil(radius)
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    inside = dy * dy + dx * dx <= radius * radius
    return np.stack([dy[inside], dx[inside]], axis=1)


def candidate_pairs(
    cand_y: np.ndarray, cand_x: np.ndarray, gt: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """All (candidate index, ground-truth index) pairs closer than `radius`, sorted, and
    the number of ground-truth pixels. Ground-truth pixels are indexed in row-major order."""
    h, w = gt.shape
    offsets = disc_offsets(radius)
    r = int(np.abs(offsets).max()) if len(offsets) else 0
    gy, gx = np.nonzero(gt)
    index = np.full((h + 2 * r, w + 2 * r), -1, dtype=np.int64)
    index[gy + r, gx + r] = np.arange(len(gy))
    rows, cols = [], []
    for dy, dx in offsets:
        hit = index[cand_y + r + dy, cand_x + r + dx]
        found = hit >= 0
        rows.append(np.nonzero(found)[0])
        cols.append(hit[found])
    rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    cols = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    order = np.lexsort((cols, rows))
    return rows[order], cols[order], len(gy)


def match_count(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int) -> int:
    """Size of a maximum one-to-one matching of the bipartite graph given by its edge list, sorted by
    (row, col): the maximum flow of source -> rows -> columns -> sink with unit capacities (Dinic's
    algorithm, polynomial; `maximum_bipartite_matching` can take exponential time, scipy issue #26147)."""
    if len(rows) == 0:
        return 0
    row_used = np.zeros(n_rows, dtype=bool)
    row_used[rows] = True
    col_used = np.zeros(n_cols, dtype=bool)
    col_used[cols] = True
    row_node = np.cumsum(row_used, dtype=np.int32)  # 1-based node ids of the rows in use
    n_r = int(row_node[-1])
    col_node = n_r + np.cumsum(col_used, dtype=np.int32)
    n_c = int(col_node[-1]) - n_r
    sink = n_r + n_c + 1
    per_row = np.bincount(row_node[rows] - 1, minlength=n_r)
    indptr = np.concatenate([[0, n_r], n_r + np.cumsum(per_row), len(rows) + n_r + np.arange(1, n_c + 1)])
    indptr = np.concatenate([indptr, [indptr[-1]]]).astype(np.int32)  # the sink has no edge
    indices = np.concatenate([np.arange(1, n_r + 1), col_node[cols], np.full(n_c, sink)]).astype(np.int32)
    graph = csr_matrix((np.ones(len(indices), dtype=np.int32), indices, indptr), shape=(sink + 1, sink + 1))
    return int(maximum_flow(graph, 0, sink, method="dinic").flow_value)
