"""u2net_core.metrics.SODMetrics against PySODMetrics, its reference implementation.

PySODMetrics (a test dependency) is run image by image on the same inputs; every metric must agree
to 1e-6 (the contract is 1e-4), on random maps and blob masks of several sizes, on the edge cases
(empty / full masks, constant maps, 1×1 and other tiny images) and on whole datasets, where the F
and E curves are averaged before max / mean are taken. The one intended difference, PySODMetrics'
NaN S-measure when the mask's centroid rounds to the last row or column, is pinned down in its own
test. SciPy (installed with PySODMetrics) checks the numpy distance transform directly.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings

import numpy as np
import py_sod_metrics as psm
import pytest
from scipy import ndimage

from u2net_core.metrics import (METRIC_NAMES, SODMetrics, _BAND_D2, _nearest_fg_values,
                                _squared_edt)


class _SmeasureEmptyBlockIsZero(psm.Smeasure):
    """PySODMetrics' S-measure, except that an empty block scores 0 (weight 0) instead of NaN."""

    def ssim(self, pred, gt):
        return 0.0 if pred.size == 0 else super().ssim(pred, gt)


def reference(pairs, smeasure=_SmeasureEmptyBlockIsZero) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Fmeasure's deprecation notice; NaN means of empty blocks
        mae, fm, em, sm, wfm = psm.MAE(), psm.Fmeasure(), psm.Emeasure(), smeasure(), psm.WeightedFmeasure()
        for pred, gt in pairs:
            for m in (mae, fm, em, sm, wfm):
                m.step(pred, gt)
        f, e = fm.get_results()["fm"], em.get_results()["em"]
        return {
            "mae": float(mae.get_results()["mae"]),
            "max_f": float(f["curve"].max()), "mean_f": float(f["curve"].mean()), "adp_f": float(f["adp"]),
            "max_e": float(e["curve"].max()), "mean_e": float(e["curve"].mean()), "adp_e": float(e["adp"]),
            "s_measure": float(sm.get_results()["sm"]),
            "weighted_f": float(wfm.get_results()["wfm"]),
        }


def ours(pairs) -> dict[str, float]:
    acc = SODMetrics()
    for pred, gt in pairs:
        acc.update(pred, gt)
    return acc.compute()


def assert_matches(got: dict, want: dict, what: str = "") -> None:
    assert tuple(got) == METRIC_NAMES
    for k in METRIC_NAMES:
        assert type(got[k]) is float, k
        # rel for the E-measure of 1×1 images, which is ~4.5e15 by definition
        assert got[k] == pytest.approx(want[k], abs=1e-6, rel=1e-9), f"{what} {k}: {got[k]!r} != {want[k]!r}"


# ---------------------------------------------------------------- data

def blob_gt(rng: np.random.Generator, h: int, w: int, soft: bool = False) -> np.ndarray:
    """Union of 1–3 random ellipses, some cut by the border; `soft` scatters grey levels around the
    128 threshold (128 itself is background in PySODMetrics)."""
    yy, xx = np.mgrid[:h, :w]
    m = np.zeros((h, w), dtype=bool)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(-0.1, 1.1) * h, rng.uniform(-0.1, 1.1) * w
        ry, rx = rng.uniform(0.1, 0.6) * h + 0.5, rng.uniform(0.1, 0.6) * w + 0.5
        m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    gt = np.where(m, 255, 0).astype(np.uint8)
    if soft:
        grey = rng.random((h, w)) < 0.3
        gt[grey] = rng.choice(np.array([100, 127, 128, 129, 200], dtype=np.uint8), size=int(grey.sum()))
    return gt


def random_pred(rng: np.random.Generator, gt: np.ndarray, kind: str) -> np.ndarray:
    h, w = gt.shape
    if kind == "uniform":
        return rng.integers(0, 256, (h, w), dtype=np.uint8)
    if kind == "noisy":  # a plausible saliency map: the mask, dimmed, plus noise
        return np.clip(gt * rng.uniform(0.4, 1.0) + rng.normal(0, 50, (h, w)), 0, 255).astype(np.uint8)
    if kind == "levels":  # few distinct values: ties at thresholds and at the adaptive threshold
        return (rng.integers(0, 4, (h, w)) * 85).astype(np.uint8)
    if kind == "gradient":
        yy, xx = np.mgrid[:h, :w]
        return ((xx * 3 + yy * 5) % 256).astype(np.uint8)
    raise ValueError(kind)


PRED_KINDS = ("uniform", "noisy", "levels", "gradient")
SIZES = [(2, 3), (3, 2), (7, 5), (5, 7), (16, 16), (31, 47), (64, 48), (100, 80)]


# ---------------------------------------------------------------- agreement with PySODMetrics

@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_each_image_matches_pysodmetrics(size):
    rng = np.random.default_rng(sum(size))
    for i in range(6):
        gt = blob_gt(rng, *size, soft=i % 3 == 2)
        pred = random_pred(rng, gt, PRED_KINDS[i % len(PRED_KINDS)])
        assert_matches(ours([(pred, gt)]), reference([(pred, gt)]), f"image {i}")


def test_dataset_matches_pysodmetrics():
    # Max/mean F and E are taken over the dataset-averaged curve, not averaged per image: with
    # images of different difficulty the two orders give different numbers.
    rng = np.random.default_rng(7)
    pairs = []
    for i in range(36):
        h, w = (int(v) for v in rng.integers(3, 70, 2))
        gt = blob_gt(rng, h, w, soft=i % 4 == 0)
        pairs.append((random_pred(rng, gt, PRED_KINDS[i % len(PRED_KINDS)]), gt))
    want = reference(pairs)
    assert_matches(ours(pairs), want)
    per_image = [ours([p]) for p in pairs]
    assert abs(np.mean([m["max_f"] for m in per_image]) - want["max_f"]) > 1e-3


def _edge_cases():
    rng = np.random.default_rng(3)
    gt = blob_gt(rng, 24, 32)
    noisy = random_pred(rng, gt, "noisy")
    zeros, full = np.zeros((24, 32), np.uint8), np.full((24, 32), 255, np.uint8)
    u8 = lambda a: np.array(a, dtype=np.uint8)  # noqa: E731
    cases = {
        "empty_gt": (noisy, zeros),
        "full_gt": (noisy, full),
        "pred_all_0": (zeros, gt),
        "pred_all_255": (full, gt),
        "pred_constant_77": (np.full_like(zeros, 77), gt),
        "pred_all_255_empty_gt": (full, zeros),
        "pred_all_0_full_gt": (zeros, full),
        "perfect": (gt, gt),
        "inverted": (255 - gt, gt),
        "gt_128_is_background": (u8([[10, 20, 30], [40, 50, 60]]), u8([[128, 129, 128], [129, 0, 255]])),
        "row_1x9": (u8([[0, 50, 100, 150, 200, 250, 30, 60, 90]]), u8([[0, 0, 255, 255, 255, 0, 0, 0, 255]])),
        "column_9x1": (u8([[0, 50, 100, 150, 200, 250, 30, 60, 90]]).T, u8([[255, 0, 0, 255, 255, 0, 0, 0, 0]]).T),
        "tiny_2x3": (u8([[10, 200, 30], [40, 250, 60]]), u8([[0, 255, 0], [255, 255, 0]])),
        "tiny_7x5": (random_pred(rng, zeros[:7, :5], "uniform"), blob_gt(rng, 7, 5)),
        # centroid at x.5: numpy rounds half to even when cutting the four blocks
        "centroid_half_even": (random_pred(rng, zeros[:6, :8], "uniform"),
                               np.pad(np.full((2, 3), 255, np.uint8), ((1, 3), (1, 4)))),
        "single_fg_pixel": (noisy, np.pad(u8([[255]]), ((5, 18), (9, 22)))),
        "sparse_noise_gt": (noisy, np.where(rng.random((24, 32)) < 0.05, 255, 0).astype(np.uint8)),
    }
    for p in (0, 128, 255):
        for g in (0, 128, 129, 255):
            cases[f"1x1_pred{p}_gt{g}"] = (u8([[p]]), u8([[g]]))
    return cases


EDGE_CASES = _edge_cases()


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_case_matches_pysodmetrics(name):
    pred, gt = EDGE_CASES[name]
    assert_matches(ours([(pred, gt)]), reference([(pred, gt)]), name)


@pytest.mark.parametrize("gt", [
    np.array([[0, 0, 0], [255, 255, 255]], np.uint8),          # object in the last row
    np.array([[0, 0, 255], [0, 0, 255]], np.uint8),            # object in the last column
    np.pad(np.full((1, 20), 255, np.uint8), ((19, 0), (0, 0))),  # 20×20, bottom row
], ids=["last_row", "last_col", "bottom_row_20x20"])
def test_s_measure_has_no_nan_where_pysodmetrics_has(gt):
    pred = random_pred(np.random.default_rng(0), gt, "uniform")
    assert np.isnan(reference([(pred, gt)], smeasure=psm.Smeasure)["s_measure"])
    got = ours([(pred, gt)])
    assert np.isfinite(got["s_measure"])
    assert_matches(got, reference([(pred, gt)]))


# ---------------------------------------------------------------- the distance transform

def _masks(rng, count):
    for i in range(count):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        kind = i % 4
        if kind == 0:
            m = rng.random((h, w)) < rng.uniform(0.001, 0.3)
        elif kind == 1:
            m = blob_gt(rng, h, w) > 128
        elif kind == 2:  # dilated sparse points: many equidistant ties
            m = ndimage.binary_dilation(rng.random((h, w)) < 0.02, iterations=int(rng.integers(1, 4)))
        else:
            m = np.zeros((h, w), bool)
            m[rng.integers(0, h), :] = True
            m[:, rng.integers(0, w)] |= rng.random(h) < 0.5
        if m.any():
            yield m


def test_squared_edt_matches_scipy():
    for fg in _masks(np.random.default_rng(11), 300):
        want = ndimage.distance_transform_edt(~fg) ** 2
        got = _squared_edt(fg)
        np.testing.assert_array_equal(got[~fg], np.rint(want[~fg]).astype(np.int64), err_msg=str(fg.shape))


def test_squared_edt_large_mask():
    rng = np.random.default_rng(12)
    smooth = ndimage.gaussian_filter(rng.random((200, 260)), 12)
    fg = smooth > np.quantile(smooth, 0.7)
    want = np.rint(ndimage.distance_transform_edt(~fg) ** 2).astype(np.int64)
    np.testing.assert_array_equal(_squared_edt(fg)[~fg], want[~fg])


def test_nearest_foreground_pixel_breaks_ties_like_scipy():
    # The weighted F-measure copies the error of the nearest object pixel; among equidistant ones
    # SciPy picks the smallest column, then row. Values = flat index, so the lookup returns indices.
    for fg in _masks(np.random.default_rng(13), 200):
        h, w = fg.shape
        if fg.all():
            continue
        _, (iy, ix) = ndimage.distance_transform_edt(~fg, return_indices=True)
        d2 = _squared_edt(fg)
        band = np.flatnonzero(~fg.ravel() & (d2.ravel() <= _BAND_D2))
        got = _nearest_fg_values(np.arange(h * w).reshape(h, w), fg, d2, band)
        np.testing.assert_array_equal(got, (iy * w + ix).ravel()[band])


# ---------------------------------------------------------------- accumulator mechanics

def _dataset(seed, n):
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(4, 50, 2))
        gt = blob_gt(rng, h, w) if i % 5 else np.zeros((h, w), np.uint8)
        pairs.append((random_pred(rng, gt, PRED_KINDS[i % len(PRED_KINDS)]), gt))
    return pairs


def test_merge_of_three_shards_equals_one_accumulator():
    pairs = _dataset(21, 23)
    whole = SODMetrics()
    for p in pairs:
        whole.update(*p)
    shards = [SODMetrics() for _ in range(3)]
    for i, p in enumerate(pairs):
        shards[0 if i < 4 else 1 if i < 15 else 2].update(*p)
    merged = SODMetrics().merge(shards[2]).merge(shards[0]).merge(shards[1])
    assert merged.count == whole.count == 23
    want = whole.compute()
    for k, v in merged.compute().items():
        assert v == pytest.approx(want[k], rel=1e-12, abs=1e-12), k

    # the same as an all-reduce (SUM) of the state dicts would do
    states = [s.state_dict() for s in shards]
    summed = {k: sum(s[k] for s in states) for k in states[0]}
    for k, v in SODMetrics.from_state_dict(summed).compute().items():
        assert v == pytest.approx(want[k], rel=1e-12, abs=1e-12), k

    # an empty shard is neutral
    assert SODMetrics().merge(whole).merge(SODMetrics()).compute() == pytest.approx(want)
    with pytest.raises(TypeError):
        whole.merge(want)


def test_state_dict_round_trips():
    acc = SODMetrics()
    for p in _dataset(22, 5):
        acc.update(*p)
    want = acc.compute()
    state = acc.state_dict()
    assert set(state) == set(SODMetrics.ADDITIVE_FIELDS)
    for k, v in state.items():
        assert isinstance(v, np.ndarray) and v.dtype == np.float64, k
        assert v.shape == ((256,) if k in SODMetrics.CURVE_FIELDS else ()), k
    assert SODMetrics.from_state_dict(state).compute() == want
    assert pickle.loads(pickle.dumps(acc)).compute() == want

    torch = pytest.importorskip("torch")
    as_tensors = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    assert SODMetrics.from_state_dict(as_tensors).compute() == want

    # the state dict is a copy, not a view into the accumulator
    state["f_curve_sum"][:] = 0
    assert acc.compute() == want

    with pytest.raises(KeyError):
        SODMetrics.from_state_dict({k: v for k, v in state.items() if k != "count"})
    with pytest.raises(ValueError):
        SODMetrics.from_state_dict({**state, "count": np.float64(2.5)})
    with pytest.raises(ValueError):
        SODMetrics.from_state_dict({**state, "e_curve_sum": np.zeros(255)})


def test_compute_on_empty_accumulator_raises():
    with pytest.raises(ValueError, match="empty accumulator"):
        SODMetrics().compute()
    with pytest.raises(ValueError, match="empty accumulator"):
        SODMetrics().merge(SODMetrics()).compute()


def test_update_rejects_bad_inputs():
    acc = SODMetrics()
    gt = np.zeros((4, 5), np.uint8)
    with pytest.raises(TypeError, match="pred"):
        acc.update(np.zeros((4, 5), np.float32), gt)  # a [0, 1] probability map would be /255'd
    with pytest.raises(TypeError, match="gt"):
        acc.update(gt, gt.astype(bool))  # True > 128 is False: an all-background mask
    with pytest.raises(ValueError, match="shape"):
        acc.update(gt, np.zeros((5, 4), np.uint8))
    with pytest.raises(ValueError, match="H×W"):
        acc.update(gt[..., None], gt[..., None])
    with pytest.raises(ValueError, match="H×W"):
        acc.update(gt[:0], gt[:0])
    assert acc.count == 0


def test_module_has_no_heavy_imports():
    # u2net_core runs inside Ray workers and must not pull in ray, nor add runtime dependencies (the
    # reference stack here, SciPy / OpenCV / PySODMetrics, is test-only); nor torch, which the
    # package imports only for what needs it.
    code = ("import sys, u2net_core.metrics; "
            "bad = {'ray', 'scipy', 'cv2', 'py_sod_metrics', 'skimage', 'torch'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
