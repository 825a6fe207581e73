"""Salient-object-detection metrics as a mergeable accumulator, numerically equal to PySODMetrics.

Reference implementation: PySODMetrics (`py_sod_metrics.sod_metrics`, version 1.6.2,
https://github.com/lartpang/PySODMetrics), itself a port of the authors' MATLAB code. Every
definition below (normalisation, thresholds, ε terms, edge cases) is that package's, so that the
numbers here are comparable with published tables; `tests/test_metrics.py` checks them against it.
The one deliberate difference is in the S-measure, described below.

Each image is prepared as PySODMetrics does (`utils.prepare_data`): the ground truth is
``gt > 128`` (so 128 itself is background), the prediction is ``pred / 255`` and, unless it is
constant, min–max normalised to [0, 1] (MATLAB's ``mapminmax(im2double(pred))``). A constant
map therefore keeps its level: all-255 is 1.0 everywhere, all-0 is 0.0.

Metrics (every one is a per-image value averaged over the images, except where said):

``mae``
    Mean absolute error between the normalised prediction and the binary ground truth.
``max_f``, ``mean_f``, ``adp_f``
    F-measure with β² = 0.3 (weighting precision). For each image and each of 256 thresholds t
    (prediction quantised to ``uint8`` by truncation, then ``>= t``) an F value; these F curves
    are averaged over the dataset first, then ``max_f`` / ``mean_f`` are the maximum / mean of
    that averaged curve. ``adp_f`` binarises each image at twice its mean prediction (capped at
    1) and averages the per-image F values.
``max_e``, ``mean_e``, ``adp_e``
    E-measure (enhanced-alignment measure) with the same 256-threshold curve (dataset-averaged,
    then max / mean) and the same adaptive threshold. As in the MATLAB original, the alignment
    sum is divided by ``H·W − 1 + eps``, not ``H·W``: values above 1 occur on tiny images, and a
    1×1 image scores about 4.5e15.
``s_measure``
    Structure measure with α = 0.5: object-aware similarity of foreground and background, plus
    region-aware SSIM of the four blocks cut at the ground truth's centroid (rounded half to
    even, as ``numpy.round`` does). Empty ground truth scores ``1 - mean(pred)``, full ground
    truth ``mean(pred)``.
``weighted_f``
    Weighted F-measure (Margolin et al., β = 1): errors are spread to background pixels from
    their nearest foreground pixel (exact Euclidean distance transform), smoothed with MATLAB's
    ``fspecial('gaussian', 7, 5)``, and background errors are weighted up with their distance
    to the object. Empty ground truth scores 0.

Where this module differs from PySODMetrics: its S-measure is NaN whenever the ground truth's
centroid rounds to the last row or column, because one of the four blocks is then empty and
``0 × mean(empty) = 0 × NaN``; a single such image makes the dataset's S-measure NaN. Here an
empty block contributes 0 (its weight is 0 anyway); wherever PySODMetrics returns a number the
two agree.

PySODMetrics needs SciPy (and OpenCV) for the weighted F-measure; this module uses numpy only,
with its own exact distance transform that picks the same nearest pixel as SciPy's on ties.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

__all__ = ["SODMetrics", "METRIC_NAMES", "NUM_THRESHOLDS"]

# numpy.spacing(1), the MATLAB `eps` that PySODMetrics adds to denominators.
_EPS = float(np.spacing(1))
NUM_THRESHOLDS = 256
METRIC_NAMES = ("mae", "max_f", "mean_f", "adp_f", "max_e", "mean_e", "adp_e", "s_measure", "weighted_f")

_F_BETA2 = 0.3   # F-measure's β² (PySODMetrics calls it `beta`)
_WF_BETA = 1.0   # weighted F-measure's β (used as 1 + β, as in PySODMetrics)
_S_ALPHA = 0.5


def _gauss_1d(size: int = 7, sigma: float = 5.0) -> np.ndarray:
    # fspecial('gaussian', 7, 5) is an outer product of this vector with itself (no tap falls under
    # MATLAB's eps·max cut-off at this size), so the 7×7 filter runs as two 7-tap passes.
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x * x) / (2 * sigma * sigma))
    return k / k.sum()


_GAUSS = _gauss_1d()
_GAUSS_RADIUS = (len(_GAUSS) - 1) // 2

# Background pixels whose error can reach an object pixel through the 7×7 blur lie within
# Chebyshev distance 3 of the object, hence within squared Euclidean distance 18.
_BAND_D2 = 2 * _GAUSS_RADIUS * _GAUSS_RADIUS


def _offsets_by_length(max_d2: int) -> dict[int, np.ndarray]:
    """Offsets (dy, dx) with 0 < dy² + dx² <= max_d2, grouped by squared length and ordered by
    (dx, dy): SciPy's feature transform breaks ties between equidistant foreground pixels towards
    the smallest column, then the smallest row."""
    reach = math.isqrt(max_d2)
    groups: dict[int, list[tuple[int, int]]] = {}
    for dx in range(-reach, reach + 1):
        for dy in range(-reach, reach + 1):
            d2 = dx * dx + dy * dy
            if 0 < d2 <= max_d2:
                groups.setdefault(d2, []).append((dy, dx))
    return {d2: np.array(sorted(offs, key=lambda o: (o[1], o[0])), dtype=np.int64) for d2, offs in groups.items()}


_OFFSETS_BY_D2 = _offsets_by_length(_BAND_D2)


def _prepare(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Same float operations in the same order as `py_sod_metrics.utils.prepare_data`: the
    # quantisation `(pred * 255).astype(uint8)` truncates, so a value that lands on 127.99999…
    # instead of 128.0 would move a pixel to another threshold bin.
    gt = gt > 128
    pred = pred / 255
    if pred.max() != pred.min():
        pred = (pred - pred.min()) / (pred.max() - pred.min())
    return pred, gt


def _e_measure(fg_fg, fg_bg, n_fg: int, n: int):
    """E-measure from counts of predicted-foreground pixels inside / outside the ground truth.

    Works on scalars (adaptive threshold) and on per-threshold arrays (the curve) alike, so that both
    go through one copy of PySODMetrics' formula. The enhanced-alignment matrix takes only four
    values (pred fg/bg × gt fg/bg), so its sum is four products of a value and a pixel count.
    """
    pred_fg = fg_fg + fg_bg
    pred_bg = n - pred_fg
    if n_fg == 0:
        enhanced_sum = pred_bg
    elif n_fg == n:
        enhanced_sum = pred_fg
    else:
        bg_fg = n_fg - fg_fg
        bg_bg = pred_bg - bg_fg
        mean_pred = pred_fg / n
        mean_gt = n_fg / n
        enhanced_sum = 0
        for numel, p, g in ((fg_fg, 1 - mean_pred, 1 - mean_gt), (fg_bg, 1 - mean_pred, 0 - mean_gt),
                            (bg_fg, 0 - mean_pred, 1 - mean_gt), (bg_bg, 0 - mean_pred, 0 - mean_gt)):
            align = 2 * (p * g) / (p ** 2 + g ** 2 + _EPS)
            enhanced_sum = enhanced_sum + (align + 1) ** 2 / 4 * numel
    return enhanced_sum / (n - 1 + _EPS)


def _ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    n = pred.size
    if n == 0:
        # PySODMetrics computes 0 × NaN here (see the module docstring); the block's weight is 0.
        return 0.0
    x = np.mean(pred)
    y = np.mean(gt)
    # Kept operation for operation: `alpha == 0` and `beta == 0` are exact tests, and a
    # reordered sum can turn an exact 0 into 1e-17, which flips a block's score between 0 and 1.
    sigma_x = np.sum((pred - x) ** 2) / (n - 1 + _EPS)
    sigma_y = np.sum((gt - y) ** 2) / (n - 1 + _EPS)
    sigma_xy = np.sum((pred - x) * (gt - y)) / (n - 1 + _EPS)
    alpha = 4 * x * y * sigma_xy
    beta = (x ** 2 + y ** 2) * (sigma_x + sigma_y)
    if alpha != 0:
        return float(alpha / (beta + _EPS))
    return 1.0 if beta == 0 else 0.0


def _s_object(x: np.ndarray) -> float:
    mean = np.mean(x)
    std = np.std(x, ddof=1) if x.size > 1 else 0.0
    return float(2 * mean / (mean ** 2 + 1 + std + _EPS))


def _s_measure(pred: np.ndarray, gt: np.ndarray, n_fg: int) -> float:
    n = gt.size
    if n_fg == 0:
        return float(1 - np.mean(pred))
    if n_fg == n:
        return float(np.mean(pred))
    gt_mean = np.mean(gt)
    object_score = (_s_object(pred[gt]) * gt_mean + _s_object((1 - pred)[~gt]) * (1 - gt_mean)) * _S_ALPHA

    h, w = gt.shape
    rows, cols = np.nonzero(gt)
    # Integer sums are exact in float64, so these means equal PySODMetrics' argwhere().mean();
    # np.round rounds half to even, which decides the split on symmetric objects.
    cy = int(np.round(rows.mean())) + 1
    cx = int(np.round(cols.mean())) + 1
    gt_f = gt.astype(np.float64)
    w_lt = cx * cy / n
    w_rt = cy * (w - cx) / n
    w_lb = (h - cy) * cx / n
    w_rb = 1 - w_lt - w_rt - w_lb
    region_score = (_ssim(pred[:cy, :cx], gt_f[:cy, :cx]) * w_lt + _ssim(pred[:cy, cx:], gt_f[:cy, cx:]) * w_rt
                    + _ssim(pred[cy:, :cx], gt_f[cy:, :cx]) * w_lb + _ssim(pred[cy:, cx:], gt_f[cy:, cx:]) * w_rb)
    return max(0.0, float(object_score + region_score * (1 - _S_ALPHA)))


_EDT_STRIDES = (16, 8, 4, 2)


def _squared_edt(fg: np.ndarray) -> np.ndarray:
    """Exact squared Euclidean distance from every background pixel to the nearest True pixel of `fg`.

    `fg` must hold at least one True; values at foreground pixels are not meaningful. Separable, like
    SciPy's (Maurer et al.): first g(r, c), the distance to the nearest foreground pixel in the same
    column, then per row the lower envelope of the parabolas (x − c)² + g(r, c)², i.e. the lower
    convex hull of the points (c, g² + c²). The textbook stack walk is one Python step per column;
    here the hull is found for all rows at once by deleting points that cannot be on it, in
    vectorised rounds, until none is left. Two kinds of deletion, both exact (integers throughout):

    - a point strictly above the chord of any two others of its row is never the row minimum at
      any x, so all such points may go at once (used with the points d places away, d = 16, 8, 4,
      2: a few dense passes that remove most non-hull points);
    - a point on or above the chord of its two neighbours may go; a run of such points is a concave
      chain, so the run's two surviving neighbours beat each of its points everywhere, and whole
      runs go at once. Repeated on linked lists until no point qualifies, which leaves the hull.
    """
    h, w = fg.shape
    sites = np.flatnonzero(fg.any(axis=0))
    n = sites.size
    f = fg[:, sites]
    r = np.arange(h, dtype=np.int32)[:, None]
    far = np.int32(2 * (h + w) + 2)
    above = np.where(f, r, -far)
    np.maximum.accumulate(above, axis=0, out=above)
    below = np.where(f[::-1], r[::-1], h + far)
    np.minimum.accumulate(below, axis=0, out=below)
    g = np.minimum(r - above, below[::-1] - r)  # every site column holds a foreground pixel
    gsq2 = g.astype(np.int64) ** 2
    sites = sites.astype(np.int64)
    key2 = gsq2 + sites * sites

    # First round on the dense (row, site) grid, where neighbours are plain slices.
    keep = np.ones((h, n), dtype=bool)
    if n >= 3:
        ku, kv, kw = key2[:, :-2], key2[:, 1:-1], key2[:, 2:]
        cu, cv, cw = sites[:-2], sites[1:-1], sites[2:]
        keep[:, 1:-1] = (kv - ku) * (cw - cu) < (kw - ku) * (cv - cu)
        # Inside a horizontal run of object pixels a site is beaten by its run neighbours at every
        # pixel but its own, which is object: dropping it changes no background distance.
        z = g == 0
        adjacent = (cv - cu == 1) & (cw - cv == 1)
        keep[:, 1:-1] &= ~(z[:, 1:-1] & z[:, :-2] & z[:, 2:] & adjacent)
    idx = np.flatnonzero(keep)
    row = idx // n
    col = sites[idx % n]
    key = key2.ravel()[idx]
    gsq = gsq2.ravel()[idx]
    for d in _EDT_STRIDES:
        if row.size <= 2 * d:
            break
        cu, cv, cw = col[:-2 * d], col[d:-d], col[2 * d:]
        ku, kv, kw = key[:-2 * d], key[d:-d], key[2 * d:]
        drop = (row[:-2 * d] == row[2 * d:]) & ((kv - ku) * (cw - cu) > (kw - ku) * (cv - cu))
        if drop.any():
            keep = np.ones(row.size, dtype=bool)
            keep[d:-d] = ~drop
            row, col, key, gsq = row[keep], col[keep], key[keep], gsq[keep]
    m = row.size

    # Then per-row doubly linked lists over the survivors; only neighbours of deleted runs are
    # retested, so later rounds are small.
    row_start = np.ones(m, dtype=bool)
    row_start[1:] = row[1:] != row[:-1]
    row_end = np.ones(m, dtype=bool)
    row_end[:-1] = row_start[1:]
    prev = np.arange(-1, m - 1, dtype=np.int64)
    prev[row_start] = -1
    nxt = np.arange(1, m + 1, dtype=np.int64)
    nxt[row_end] = -1
    alive = np.ones(m, dtype=bool)
    flag = np.zeros(m, dtype=bool)
    cand = np.flatnonzero(~(row_start | row_end))
    while cand.size:
        u, wn = prev[cand], nxt[cand]
        ku, cu = key[u], col[u]
        dropped = cand[(key[cand] - ku) * (col[wn] - cu) >= (key[wn] - ku) * (col[cand] - cu)]
        if not dropped.size:
            break
        # Sorted and unique, so that the k-th run start and the k-th run end belong together.
        dropped.sort()
        dropped = dropped[np.r_[True, dropped[1:] != dropped[:-1]]]
        flag[dropped] = True
        first = dropped[~flag[prev[dropped]]]
        last = dropped[~flag[nxt[dropped]]]
        flag[dropped] = False
        alive[dropped] = False
        left, right = prev[first], nxt[last]
        nxt[left] = right
        prev[right] = left
        cand = np.concatenate((left[prev[left] >= 0], right[nxt[right] >= 0]))

    # Hull site u owns x up to floor((key_v − key_u) / (2 (c_v − c_u))), v its right neighbour; the
    # owned ranges tile each row left to right, so repeating each site over its range fills the image.
    hull = np.flatnonzero(alive)
    hcol, hkey = col[hull], key[hull]
    same = row[hull][1:] == row[hull][:-1]
    lo = np.zeros(hull.size, dtype=np.int64)
    lo[1:][same] = (hkey[1:][same] - hkey[:-1][same]) // (2 * (hcol[1:][same] - hcol[:-1][same])) + 1
    np.clip(lo, 0, w, out=lo)
    hi = np.full(hull.size, w, dtype=np.int64)
    hi[:-1][same] = lo[1:][same]
    count = np.maximum(hi - lo, 0)
    dx = np.tile(np.arange(w, dtype=np.int64), h) - np.repeat(hcol, count)
    return (dx * dx + np.repeat(gsq[hull], count)).reshape(h, w)


def _background_weights() -> np.ndarray:
    # PySODMetrics' `B` off the object, 2 − 0.5^(dist / 5), tabulated by squared distance (an exp
    # per pixel costs more than a lookup). From dist = 300 on, 0.5^(dist / 5) < 2^-60 and the
    # difference rounds to exactly 2.0 in float64, so one 90k-entry table serves any image size.
    table = 2 - np.exp(np.log(0.5) / 5 * np.sqrt(np.arange(300 * 300 + 1, dtype=np.float64)))
    assert table[-1] == 2.0
    return table


_BG_WEIGHT = _background_weights()


def _nearest_fg_values(values: np.ndarray, fg: np.ndarray, d2: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """values[nearest foreground pixel] for each flat index in `pixels`, with SciPy's tie-breaking.

    Only pixels within `_BAND_D2` of the foreground are asked for; their exact squared distance
    `d2` is known, so only offsets of that length are tried, in SciPy's (column, row) order.
    """
    h, w = fg.shape
    out = np.empty(pixels.size, dtype=values.dtype)
    py, px = np.divmod(pixels, w)
    pd2 = d2.ravel()[pixels]
    for dist2 in np.unique(pd2):
        sel = np.flatnonzero(pd2 == dist2)
        offs = _OFFSETS_BY_D2[int(dist2)]
        y = py[sel, None] + offs[None, :, 0]
        x = px[sel, None] + offs[None, :, 1]
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        y, x = np.where(inside, y, 0), np.where(inside, x, 0)
        hit = inside & fg[y, x]
        first = hit.argmax(axis=1)
        rows = np.arange(sel.size)
        out[sel] = values[y[rows, first], x[rows, first]]
    return out


def _weighted_f(pred: np.ndarray, gt: np.ndarray, n_fg: int) -> float:
    if n_fg == 0:
        return 0.0
    h, w = gt.shape
    err = np.abs(pred - gt)
    bg = ~gt
    err_t = err
    if n_fg < gt.size:
        d2 = _squared_edt(gt)
        # Background errors are replaced by their nearest foreground pixel's error only to be
        # blurred into foreground pixels; the 7×7 window reaches background pixels at most 3√2
        # away from the object, so only those need the (tie-exact) nearest-pixel lookup.
        band = np.flatnonzero(bg.ravel() & (d2.ravel() <= _BAND_D2))
        err_t = err.copy()
        err_t.ravel()[band] = _nearest_fg_values(err, gt, d2, band)
        fp_w = np.sum(err[bg] * _BG_WEIGHT[np.minimum(d2[bg], _BG_WEIGHT.size - 1)])
    else:
        fp_w = 0.0
    # imfilter(·, fspecial('gaussian', 7, 5)) with zero padding, as two 1-D passes, and only over
    # the object's bounding box: the blurred error is used on object pixels only.
    rad = _GAUSS_RADIUS
    rows = np.flatnonzero(gt.any(axis=1))
    cols = np.flatnonzero(gt.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    bh, bw = r1 - r0, c1 - c0
    padded = np.zeros((bh + 2 * rad, bw + 2 * rad))
    y0, y1, x0, x1 = max(r0 - rad, 0), min(r1 + rad, h), max(c0 - rad, 0), min(c1 + rad, w)
    padded[y0 - r0 + rad:y1 - r0 + rad, x0 - c0 + rad:x1 - c0 + rad] = err_t[y0:y1, x0:x1]
    horiz = _GAUSS[0] * padded[:, 0:bw]
    for i in range(1, len(_GAUSS)):
        horiz += _GAUSS[i] * padded[:, i:i + bw]
    blurred = _GAUSS[0] * horiz[0:bh]
    for i in range(1, len(_GAUSS)):
        blurred += _GAUSS[i] * horiz[i:i + bh]

    gt_box = gt[r0:r1, c0:c1]
    ew_fg = np.minimum(blurred[gt_box], err[r0:r1, c0:c1][gt_box])  # MIN_E_EA on the object; weight 1
    tp_w = n_fg - np.sum(ew_fg)
    recall = 1 - np.mean(ew_fg)
    precision = tp_w / (tp_w + fp_w + _EPS)
    return float((1 + _WF_BETA) * recall * precision / (recall + _WF_BETA * precision + _EPS))


class SODMetrics:
    """Mergeable accumulator of MAE, F-, E-, S- and weighted F-measure over a set of images.

    ``update(pred, gt)`` per image; ``merge(other)`` folds in another accumulator (e.g. one per
    data shard or Ray Train worker); ``compute()`` returns the dataset values. Every piece of
    state is a sum over images (including the image count), so merging shards in any grouping
    gives what one accumulator over all images gives (up to float summation order), and an
    all-reduce with SUM over ``state_dict()`` tensors is a valid merge.

    State (all fields additive):

    - ``count``: number of images;
    - ``mae_sum``, ``adp_f_sum``, ``adp_e_sum``, ``s_measure_sum``, ``weighted_f_sum``: sums of
      the per-image values;
    - ``f_curve_sum``, ``e_curve_sum``: per-threshold sums of the per-image F and E curves,
      shape (256,), index i holding threshold 255 − i (PySODMetrics' order).
    """

    SCALAR_FIELDS = ("count", "mae_sum", "adp_f_sum", "adp_e_sum", "s_measure_sum", "weighted_f_sum")
    CURVE_FIELDS = ("f_curve_sum", "e_curve_sum")
    ADDITIVE_FIELDS = SCALAR_FIELDS + CURVE_FIELDS

    def __init__(self) -> None:
        self.count = 0
        self.mae_sum = 0.0
        self.adp_f_sum = 0.0
        self.adp_e_sum = 0.0
        self.s_measure_sum = 0.0
        self.weighted_f_sum = 0.0
        self.f_curve_sum = np.zeros(NUM_THRESHOLDS, dtype=np.float64)
        self.e_curve_sum = np.zeros(NUM_THRESHOLDS, dtype=np.float64)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"SODMetrics(count={self.count})"

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: `pred` a uint8 H×W saliency map, `gt` a uint8 H×W mask (> 128 is object)."""
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        for name, a in (("pred", pred), ("gt", gt)):
            if a.dtype != np.uint8:
                # A float map in [0, 1] or a bool mask would be silently wrong after /255 or > 128.
                raise TypeError(f"{name} must be a uint8 array (0..255), got dtype {a.dtype}")
            if a.ndim != 2 or a.size == 0:
                raise ValueError(f"{name} must be a non-empty H×W array, got shape {a.shape}")
        if pred.shape != gt.shape:
            raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")

        pred_f, gt_b = _prepare(pred, gt)
        n = gt_b.size
        n_fg = int(np.count_nonzero(gt_b))

        self.mae_sum += float(np.mean(np.abs(pred_f - gt_b)))

        # Threshold curves: per-level pixel counts inside / outside the object, then counts of
        # pixels >= each threshold by a reversed cumulative sum (np.histogram with 256 unit bins
        # in PySODMetrics; bincount is the same on integers and much faster).
        quant = (pred_f * 255).astype(np.uint8)
        hist_all = np.bincount(quant.ravel(), minlength=NUM_THRESHOLDS)
        hist_fg = np.bincount(quant[gt_b], minlength=NUM_THRESHOLDS)
        tp = np.cumsum(hist_fg[::-1])
        fp = np.cumsum((hist_all - hist_fg)[::-1])

        positives = tp + fp
        positives[positives == 0] = 1  # the numerator is 0 there too
        precision = tp / positives
        recall = tp / max(n_fg, 1)
        num = (1 + _F_BETA2) * precision * recall
        den = np.where(num == 0, 1, _F_BETA2 * precision + recall)
        self.f_curve_sum += num / den
        self.e_curve_sum += _e_measure(tp, fp, n_fg, n)

        adaptive = pred_f >= min(2 * pred_f.mean(), 1)
        adp_tp = int(np.count_nonzero(adaptive & gt_b))
        adp_pos = int(np.count_nonzero(adaptive))
        if adp_tp == 0:
            adp_f = 0.0
        else:
            pre, rec = adp_tp / adp_pos, adp_tp / n_fg
            adp_f = (1 + _F_BETA2) * pre * rec / (_F_BETA2 * pre + rec)
        self.adp_f_sum += adp_f
        self.adp_e_sum += float(_e_measure(adp_tp, adp_pos - adp_tp, n_fg, n))

        self.s_measure_sum += _s_measure(pred_f, gt_b, n_fg)
        self.weighted_f_sum += _weighted_f(pred_f, gt_b, n_fg)
        self.count += 1

    def merge(self, other: "SODMetrics") -> "SODMetrics":
        """Fold `other`'s images into this accumulator (in place); returns self."""
        if not isinstance(other, SODMetrics):
            raise TypeError(f"can only merge another SODMetrics, got {type(other).__name__}")
        for name in self.ADDITIVE_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def compute(self) -> dict[str, float]:
        """Dataset metrics, keyed by `METRIC_NAMES`."""
        if self.count == 0:
            raise ValueError("SODMetrics.compute() on an empty accumulator: no image was added "
                             "(update() never called, or every merged shard was empty)")
        n = self.count
        f_curve = self.f_curve_sum / n
        e_curve = self.e_curve_sum / n
        return {
            "mae": self.mae_sum / n,
            "max_f": float(f_curve.max()),
            "mean_f": float(f_curve.mean()),
            "adp_f": self.adp_f_sum / n,
            "max_e": float(e_curve.max()),
            "mean_e": float(e_curve.mean()),
            "adp_e": self.adp_e_sum / n,
            "s_measure": self.s_measure_sum / n,
            "weighted_f": self.weighted_f_sum / n,
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        """All state as float64 arrays (0-d for scalars, (256,) for curves), every one additive:
        summing the dicts of several accumulators field by field (e.g. an all-reduce SUM of the
        arrays as tensors) and loading the result with `from_state_dict` merges them."""
        d = {name: np.asarray(getattr(self, name), dtype=np.float64) for name in self.SCALAR_FIELDS}
        d.update({name: getattr(self, name).astype(np.float64, copy=True) for name in self.CURVE_FIELDS})
        return d

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> "SODMetrics":
        """Inverse of `state_dict`; accepts numpy arrays, python numbers or CPU tensors."""
        missing = set(cls.ADDITIVE_FIELDS) - set(d)
        if missing:
            raise KeyError(f"state dict lacks {sorted(missing)}")
        def scalar(name: str) -> float:
            a = np.asarray(d[name], dtype=np.float64).reshape(-1)
            if a.size != 1:
                raise ValueError(f"{name} must be a single value, got {a.size}")
            return float(a[0])

        m = cls()
        count = scalar("count")
        if not (count >= 0 and count == math.floor(count)):
            raise ValueError(f"state dict count must be a non-negative integer, got {count}")
        m.count = int(count)
        for name in cls.SCALAR_FIELDS[1:]:
            setattr(m, name, scalar(name))
        for name in cls.CURVE_FIELDS:
            curve = np.asarray(d[name], dtype=np.float64).reshape(-1).copy()
            if curve.size != NUM_THRESHOLDS:
                raise ValueError(f"{name} must have {NUM_THRESHOLDS} values, got {curve.size}")
            setattr(m, name, curve)
        return m
