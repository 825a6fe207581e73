"""Procedurally generated salient-object dataset, standing in for DUTS (no download needed).

Layout written (DUTS-style, one folder per kind, matching stems)::

    DIR/images/synth_000000.jpg   RGB JPEG, quality 90
    DIR/masks/synth_000000.png    8-bit grayscale PNG, 0..255, soft anti-aliased edges
    DIR/val/images/synth_val_000000.jpg   (only with --val-count M > 0; DIR/val is itself a
    DIR/val/masks/synth_val_000000.png     dataset root with the same layout)

Usage::

    python -m jobs.make_dataset --output DIR --count N --seed S [--size 320] [--val-count M]
                                [--aspect-jitter [J]] [--start I] [--workers K]

Every sample depends only on ``(seed, stream, index)`` (``stream`` 0 = train, 1 = val) through
``numpy.random.default_rng([seed, stream, index])``, so output is byte-identical for identical
arguments (on the same numpy/Pillow/libjpeg stack) and generation can be sharded freely
(``--start``/``--count``, ``--workers``).

What makes it non-trivial: foreground and background colours are drawn from the *same*
distribution (a colour pair is drawn i.i.d. and rejected only when the two are too similar, which is
symmetric), so no global colour threshold separates them across the dataset.  Saliency is carried by
size, compactness, contrast to the local surround, sharpness and a centre bias; the backgrounds are
textured (gradients, value noise, stripes, checkers, split regions, optional defocus blur) and
cluttered with non-salient distractors: many small shapes, thin wires, large shapes cut by the
frame, and medium-sized shapes with low contrast to their surround.  Foreground objects are
ellipses, polygons, stars, Fourier blobs, optionally with holes and thin protruding parts, textured
(solid, gradient, stripes, noise, checker), 5-60 % of the image area, one or (sometimes) two.

Python API: ``generate_sample``, ``write_sample``, ``write_dataset``; CLI plumbing:
``add_arguments``, ``run``, ``build_parser``, ``main`` (reusable as a subcommand).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

TRAIN_STREAM = 0
VAL_STREAM = 1
JPEG_QUALITY = 90
_PROFILE_SAMPLES = 1024
_TWO_PI = 2.0 * math.pi
_THETA = np.linspace(0.0, _TWO_PI, _PROFILE_SAMPLES, endpoint=False)
_COS, _SIN = np.cos(_THETA), np.sin(_THETA)

# --------------------------------------------------------------------------- colours and textures


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32)


def _colour(rng: np.random.Generator) -> np.ndarray:
    """One colour from the single palette distribution shared by foreground and background."""
    s = rng.uniform(0.0, 0.15) if rng.random() < 0.2 else rng.uniform(0.2, 1.0)
    return _hsv_to_rgb(rng.random(), s, rng.uniform(0.12, 1.0))


def _dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.sum((a - b) ** 2)))


def _colour_pair(rng: np.random.Generator, min_dist: float) -> tuple[np.ndarray, np.ndarray]:
    """Two i.i.d. colours, resampled together until they differ: both marginals stay identical."""
    for _ in range(64):
        a, b = _colour(rng), _colour(rng)
        if _dist(a, b) >= min_dist:
            return a, b
    return a, b  # pragma: no cover - practically unreachable


def _near(rng: np.random.Generator, c: np.ndarray, amount: float) -> np.ndarray:
    return np.clip(c + rng.uniform(-amount, amount, 3).astype(np.float32), 0.0, 1.0)


def _secondary(rng: np.random.Generator, c: np.ndarray) -> np.ndarray:
    """Second colour of a texture: usually a shade of the first, sometimes anything."""
    if rng.random() < 0.6:
        shade = np.float32(rng.uniform(0.55, 1.35))
        return np.clip(_near(rng, c, 0.12) * shade, 0.0, 1.0)
    return _colour(rng)


def _value_noise(rng: np.random.Generator, h: int, w: int, cells: float) -> np.ndarray:
    """Smooth noise in [0, 1] (h, w): a coarse random grid upsampled bicubically, 1-2 octaves."""
    out = np.zeros((h, w), np.float32)
    weight = 0.0
    for octave in range(1 + int(rng.random() < 0.5)):
        c = cells * (2.5**octave)
        gh, gw = max(2, int(round(h / c)) + 2), max(2, int(round(w / c)) + 2)
        grid = Image.fromarray(rng.random((gh, gw), dtype=np.float32), mode="F")
        amp = 0.5**octave
        out += amp * np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC), np.float32)
        weight += amp
    out /= weight
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / max(hi - lo, 1e-6)


TEXTURES = ("solid", "gradient", "stripes", "noise", "checker")


def _texture(
    rng: np.random.Generator,
    kind: str,
    c0: np.ndarray,
    c1: np.ndarray,
    h: int,
    w: int,
    scale: float,
) -> np.ndarray:
    """(h, w, 3) float32 texture mixing c0 and c1.  ``scale`` is the feature size in pixels."""
    h, w = int(h), int(w)
    if kind == "solid":
        return np.broadcast_to(c0, (h, w, 3))
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    ang = rng.uniform(0.0, math.pi)
    ca, sa = np.float32(math.cos(ang)), np.float32(math.sin(ang))
    if kind == "gradient" and rng.random() < 0.3:  # radial shading
        cy, cx = np.float32(rng.uniform(0, h)), np.float32(rng.uniform(0, w))
        t = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        t *= np.float32(1.0 / max(float(t.max()), 1e-6))
    elif kind == "gradient":
        # t = x*ca + y*sa normalised to [0, 1]; its extremes sit at the box corners
        ex, ey = float(ca) * (w - 1), float(sa) * (h - 1)
        lo = min(0.0, ex) + min(0.0, ey)
        span = max(max(0.0, ex) + max(0.0, ey) - lo, 1e-6)
        t = (x * np.float32(ca / span) - np.float32(lo / span)) + y * np.float32(sa / span)
    elif kind == "stripes":
        period = max(3.0, scale * rng.uniform(0.15, 0.6))
        t = 0.5 + 0.5 * np.sin((x * ca + y * sa) * np.float32(_TWO_PI / period))
        if rng.random() < 0.6:  # hard-ish stripes
            t = np.clip((t - 0.5) * 6.0 + 0.5, 0.0, 1.0)
    elif kind == "checker":
        period = max(4.0, scale * rng.uniform(0.15, 0.5))
        k = np.float32(math.pi / period)
        u = np.sin((x * ca + y * sa) * k)
        v = np.sin((y * ca - x * sa) * k)
        t = np.clip(u * v * 8.0 + 0.5, 0.0, 1.0)
    elif kind == "noise":
        t = _value_noise(rng, h, w, max(2.0, scale * rng.uniform(0.05, 0.3)))
    else:  # pragma: no cover - programming error
        raise ValueError(kind)
    t = np.broadcast_to(t, (h, w))[..., None]
    return c0 + (c1 - c0) * t


# --------------------------------------------------------------------------- shapes

SHAPES = ("ellipse", "polygon", "star", "blob")


def _profile(rng: np.random.Generator, kind: str) -> np.ndarray:
    """Radius r(theta) of a star-shaped outline, sampled at _PROFILE_SAMPLES angles."""
    theta = _THETA
    if kind == "ellipse":  # anisotropy comes from the (sx, sy) stretch
        return np.ones_like(theta)
    if kind == "blob":
        r = np.ones_like(theta)
        for k in range(2, 2 + int(rng.integers(2, 6))):
            r += rng.normal(0.0, 0.32 / k) * np.cos(k * theta + rng.uniform(0, _TWO_PI))
        return np.maximum(r, 0.3)
    if kind == "polygon":
        n = int(rng.integers(3, 9))
        if rng.random() < 0.5:
            ang = np.arange(n) * (_TWO_PI / n)
            rad = np.ones(n)
        else:
            # Irregular: every angular gap must stay well below pi, or the centre falls outside
            # the polygon and r(theta) stops describing it.
            gaps = np.ones(n)
            for _ in range(16):
                cand = rng.uniform(0.5, 1.5, n)
                if cand.max() < 0.4 * cand.sum():
                    gaps = cand
                    break
            ang = np.cumsum(gaps) / gaps.sum() * _TWO_PI
            rad = rng.uniform(0.7, 1.2, n)
    else:  # star
        n = int(rng.integers(4, 9))
        ang = np.arange(2 * n) * (math.pi / n)
        rad = np.where(np.arange(2 * n) % 2 == 0, 1.0, rng.uniform(0.35, 0.7))
    ang = (ang + rng.uniform(0, _TWO_PI)) % _TWO_PI
    order = np.argsort(ang)
    ang, rad = ang[order], rad[order]
    px, py = rad * np.cos(ang), rad * np.sin(ang)
    j = (np.searchsorted(ang, theta, side="right") - 1) % len(ang)
    k = (j + 1) % len(ang)
    ex, ey = px[k] - px[j], py[k] - py[j]
    ux, uy = _COS, _SIN
    # ray from the origin along u hits the edge P_j -> P_k at t = cross(P_j, E) / cross(u, E)
    den = ux * ey - uy * ex
    den = np.where(np.abs(den) < 1e-9, 1e-9, den)
    return np.minimum(np.abs((px[j] * ey - py[j] * ex) / den), rad.max())


class _Shape:
    """A star-shaped outline with optional hole and thin parts, placed in image coordinates."""

    def __init__(self, rng: np.random.Generator, kind: str, radius: float, cx: float, cy: float):
        self.kind = kind
        self.profile = _profile(rng, kind).astype(np.float32)
        peak = float(self.profile.max())
        self.profile /= peak
        self.radius = radius  # pixels, of the outline's farthest point before stretching
        stretch = rng.uniform(1.0, 2.6 if kind == "ellipse" else 1.6)
        self.sx, self.sy = math.sqrt(stretch), 1.0 / math.sqrt(stretch)
        self.angle = rng.uniform(0, math.pi)
        self.cx, self.cy = cx, cy
        self.hole = 0.0
        self.hole_offset = (0.0, 0.0)
        self.sticks: list[tuple[float, float, float, float, float]] = []

    def add_hole(self, rng: np.random.Generator) -> None:
        self.hole = rng.uniform(0.3, 0.55)
        self.hole_offset = tuple(rng.uniform(-0.12, 0.12, 2))  # in units of radius

    def add_sticks(self, rng: np.random.Generator, n: int) -> None:
        for _ in range(n):
            a = rng.uniform(0, _TWO_PI)
            r0 = self.radius * rng.uniform(0.2, 0.5)
            r1 = self.radius * rng.uniform(1.15, 1.8)
            half_width = rng.uniform(0.8, 3.0)
            x0, y0 = self.cx + r0 * math.cos(a), self.cy + r0 * math.sin(a)
            a += rng.uniform(-0.3, 0.3)
            x1, y1 = self.cx + r1 * math.cos(a), self.cy + r1 * math.sin(a)
            self.sticks.append((x0, y0, x1, y1, half_width))

    def unit_area(self) -> float:
        """Area of the outline (hole removed, sticks ignored) per radius**2."""
        return math.pi * float(np.mean(self.profile.astype(np.float64) ** 2)) * (1 - self.hole**2)

    def half_extent(self) -> tuple[float, float]:
        a, b = self.radius * self.sx, self.radius * self.sy
        c, s = math.cos(self.angle), math.sin(self.angle)
        return math.hypot(a * c, b * s), math.hypot(a * s, b * c)

    def bbox(self, h: int, w: int) -> tuple[int, int, int, int] | None:
        ex, ey = self.half_extent()
        x0, x1 = self.cx - ex - 3, self.cx + ex + 3
        y0, y1 = self.cy - ey - 3, self.cy + ey + 3
        for sx0, sy0, sx1, sy1, hw in self.sticks:
            x0, x1 = min(x0, sx0 - hw - 3, sx1 - hw - 3), max(x1, sx0 + hw + 3, sx1 + hw + 3)
            y0, y1 = min(y0, sy0 - hw - 3, sy1 - hw - 3), max(y1, sy0 + hw + 3, sy1 + hw + 3)
        bx0, bx1 = max(0, int(math.floor(x0))), min(w, int(math.ceil(x1)))
        by0, by1 = max(0, int(math.floor(y0))), min(h, int(math.ceil(y1)))
        if bx1 - bx0 < 3 or by1 - by0 < 3:
            return None
        return by0, by1, bx0, bx1

    def _outline_sdf(self, x: np.ndarray, y: np.ndarray, scale: float) -> np.ndarray:
        c, s = np.float32(math.cos(self.angle)), np.float32(math.sin(self.angle))
        u = (x * c + y * s) * np.float32(1.0 / self.sx)
        v = (y * c - x * s) * np.float32(1.0 / self.sy)
        rho = np.sqrt(u * u + v * v)
        pos = (np.arctan2(v, u) * np.float32(_PROFILE_SAMPLES / _TWO_PI)) % _PROFILE_SAMPLES
        i0 = pos.astype(np.int32)
        frac = pos - i0
        prof = self.profile
        r = prof[i0 % _PROFILE_SAMPLES] * (1 - frac) + prof[(i0 + 1) % _PROFILE_SAMPLES] * frac
        f = rho - r * np.float32(self.radius * scale)
        # first-order signed distance: f / |grad f| (clipped: only matters near the outline)
        gy, gx = np.gradient(f)
        g = np.clip(np.sqrt(gx * gx + gy * gy), 0.3, 4.0)
        return f / g

    def sdf(self, box: tuple[int, int, int, int]) -> np.ndarray:
        """Approximate signed distance (pixels, negative inside) over the bbox."""
        by0, by1, bx0, bx1 = box
        x = np.arange(bx0, bx1, dtype=np.float32)[None, :] + np.float32(0.5 - self.cx)
        y = np.arange(by0, by1, dtype=np.float32)[:, None] + np.float32(0.5 - self.cy)
        d = self._outline_sdf(x, y, 1.0)
        if self.hole > 0:
            ox, oy = (np.float32(o * self.radius) for o in self.hole_offset)
            d = np.maximum(d, -self._outline_sdf(x - ox, y - oy, self.hole))
        for sx0, sy0, sx1, sy1, hw in self.sticks:
            d = np.minimum(d, _capsule_sdf(bx0, bx1, by0, by1, sx0, sy0, sx1, sy1, hw))
        return d


def _capsule_sdf(bx0, bx1, by0, by1, x0, y0, x1, y1, half_width) -> np.ndarray:
    px = np.arange(bx0, bx1, dtype=np.float32)[None, :] + np.float32(0.5 - x0)
    py = np.arange(by0, by1, dtype=np.float32)[:, None] + np.float32(0.5 - y0)
    dx, dy = np.float32(x1 - x0), np.float32(y1 - y0)
    t = np.clip((px * dx + py * dy) * np.float32(1.0 / max(dx * dx + dy * dy, 1e-6)), 0.0, 1.0)
    ex, ey = px - t * dx, py - t * dy
    return np.sqrt(ex * ex + ey * ey) - np.float32(half_width)


def _alpha(sdf: np.ndarray, softness: float) -> np.ndarray:
    return np.clip(np.float32(0.5) - sdf * np.float32(1.0 / softness), 0.0, 1.0)


# --------------------------------------------------------------------------- scene


def _composite(img: np.ndarray, box, alpha: np.ndarray, tex: np.ndarray) -> None:
    by0, by1, bx0, bx1 = box
    region = img[by0:by1, bx0:bx1]
    a = alpha[..., None]
    region += (tex - region) * a


def _paint_shape(
    rng: np.random.Generator,
    img: np.ndarray,
    shape: _Shape,
    c0: np.ndarray,
    c1: np.ndarray,
    texture: str,
    softness: float,
) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    h, w = img.shape[:2]
    box = shape.bbox(h, w)
    if box is None:
        return None
    alpha = _alpha(shape.sdf(box), softness)
    tex = _texture(rng, texture, c0, c1, box[1] - box[0], box[3] - box[2], 2 * shape.radius)
    _composite(img, box, alpha, tex)
    return box, alpha


def _random_shape(rng, radius, cx, cy, hole_p=0.0, stick_p=0.0) -> _Shape:
    shape = _Shape(rng, SHAPES[int(rng.integers(len(SHAPES)))], radius, cx, cy)
    if rng.random() < hole_p:
        shape.add_hole(rng)
    if rng.random() < stick_p:
        shape.add_sticks(rng, int(rng.integers(1, 4)))
    return shape


def _background(rng: np.random.Generator, h: int, w: int, c_bg: np.ndarray) -> np.ndarray:
    kinds = ("gradient", "stripes", "noise", "checker", "noise", "gradient")
    tex = kinds[int(rng.integers(len(kinds)))]
    img = np.array(_texture(rng, tex, c_bg, _secondary(rng, c_bg), h, w, max(h, w)), np.float32)
    if rng.random() < 0.35:  # a second region (floor/wall, horizon): soft half-plane split
        ang = rng.uniform(0, _TWO_PI)
        y = np.arange(h, dtype=np.float32)[:, None] - np.float32(rng.uniform(0.2, 0.8) * h)
        x = np.arange(w, dtype=np.float32)[None, :] - np.float32(rng.uniform(0.2, 0.8) * w)
        d = x * np.float32(math.cos(ang)) + y * np.float32(math.sin(ang))
        alpha = _alpha(d, rng.uniform(1.0, 6.0))
        c2 = _colour(rng)
        kind2 = TEXTURES[int(rng.integers(len(TEXTURES)))]
        _composite(img, (0, h, 0, w), alpha, _texture(rng, kind2, c2, _secondary(rng, c2), h, w, w))
    return img


def _distractors(rng: np.random.Generator, img: np.ndarray, c_bg: np.ndarray) -> None:
    h, w = img.shape[:2]
    side = min(h, w)
    # Large shapes mostly outside the frame (walls, furniture cut by the border).
    for _ in range(int(rng.integers(0, 3))):
        radius = side * rng.uniform(0.25, 0.5)
        edge = int(rng.integers(4))
        t = rng.uniform(0, 1)
        off = radius * rng.uniform(0.55, 1.0)
        cx, cy = [(t * w, -off), (t * w, h + off), (-off, t * h), (w + off, t * h)][edge]
        c = _colour(rng)
        kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
        _paint_shape(rng, img, _random_shape(rng, radius, cx, cy), c, _secondary(rng, c), kind, 1.5)
    # Medium shapes with low contrast to what is under them.
    for _ in range(int(rng.integers(0, 3))):
        radius = side * rng.uniform(0.1, 0.25)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        under = img[int(cy) % h, int(cx) % w]
        c = _near(rng, under, 0.09)
        kind = ("solid", "noise", "gradient")[int(rng.integers(3))]
        shape = _random_shape(rng, radius, cx, cy, hole_p=0.15)
        _paint_shape(rng, img, shape, c, _near(rng, c, 0.06), kind, rng.uniform(1.0, 3.0))
    # Thin wires / twigs across the image.
    for _ in range(int(rng.integers(0, 4))):
        x0, y0, x1, y1 = rng.uniform(-0.1, 1.1, 4) * np.array([w, h, w, h])
        hw = rng.uniform(0.5, 2.0)
        box = (
            max(0, int(min(y0, y1) - hw - 2)), min(h, int(max(y0, y1) + hw + 3)),
            max(0, int(min(x0, x1) - hw - 2)), min(w, int(max(x0, x1) + hw + 3)),
        )  # fmt: skip
        if box[1] - box[0] < 2 or box[3] - box[2] < 2:
            continue
        alpha = _alpha(_capsule_sdf(box[2], box[3], box[0], box[1], x0, y0, x1, y1, hw), 1.0)
        _composite(img, box, alpha * np.float32(rng.uniform(0.5, 1.0)), _colour(rng))
    # Many small things, any colour.
    for _ in range(int(rng.integers(4, 28))):
        radius = side * math.exp(rng.uniform(math.log(0.012), math.log(0.07)))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        c = _colour(rng) if rng.random() < 0.7 else _near(rng, c_bg, 0.15)
        kind = "solid" if rng.random() < 0.7 else "gradient"
        shape = _random_shape(rng, radius, cx, cy, hole_p=0.1)
        _paint_shape(rng, img, shape, c, _secondary(rng, c), kind, rng.uniform(0.7, 1.5))


def _place(rng, shape: _Shape, h: int, w: int, others: list[tuple[float, float]]) -> None:
    """Centre-biased position keeping the object inside the frame where it fits."""
    ex, ey = shape.half_extent()
    best, best_score = (w / 2, h / 2), -1.0
    for _ in range(6):
        cx = w * float(np.clip(rng.normal(0.5, 0.14), 0.1, 0.9))
        cy = h * float(np.clip(rng.normal(0.5, 0.14), 0.1, 0.9))
        cx = min(max(cx, ex), w - ex) if 2 * ex < w else w / 2 + rng.uniform(-0.1, 0.1) * w
        cy = min(max(cy, ey), h - ey) if 2 * ey < h else h / 2 + rng.uniform(-0.1, 0.1) * h
        score = min((math.hypot(cx - ox, cy - oy) for ox, oy in others), default=1.0)
        if score > best_score:
            best, best_score = (cx, cy), score
        if not others:
            break
    shape.cx, shape.cy = best


def _output_size(rng: np.random.Generator, size, aspect_jitter: float) -> tuple[int, int]:
    if not isinstance(size, (int, np.integer)):
        h, w = (int(v) for v in size)
        return h, w
    size = int(size)
    if aspect_jitter <= 0:
        return size, size
    ratio = rng.uniform(1.0, 1.0 + aspect_jitter)
    short = max(16, int(round(size / ratio)))
    return (size, short) if rng.random() < 0.5 else (short, size)


def generate_sample(
    seed: int,
    index: int,
    size: int | tuple[int, int] = 320,
    *,
    aspect_jitter: float = 0.0,
    stream: int = TRAIN_STREAM,
) -> tuple[np.ndarray, np.ndarray]:
    """One sample: ``(rgb uint8 (H, W, 3), mask uint8 (H, W))``.

    ``size`` is the side of a square image, or an explicit ``(H, W)``.  With ``aspect_jitter`` J > 0
    (and an int size) the long side is ``size`` and the long/short ratio is uniform in [1, 1 + J],
    orientation random.  Depends only on ``(seed, stream, index, size, aspect_jitter)``.
    """
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be non-negative")
    rng = np.random.default_rng([int(seed), int(stream), int(index)])
    h, w = _output_size(rng, size, aspect_jitter)

    c_fg, c_bg = _colour_pair(rng, min_dist=0.45)
    img = _background(rng, h, w, c_bg)
    _distractors(rng, img, c_bg)
    if rng.random() < 0.3:  # shallow depth of field: blurred background, sharp subject
        u8 = Image.fromarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8))
        blurred = u8.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 3.5)))
        img = np.asarray(blurred, np.float32) * np.float32(1.0 / 255.0)

    mask = np.zeros((h, w), np.float32)
    n_obj = 2 if rng.random() < 0.25 else 1
    total_area = h * w * math.exp(rng.uniform(math.log(0.05), math.log(0.6)))
    first_share = 1.0 if n_obj == 1 else rng.uniform(0.35, 0.65)
    shares = [first_share] if n_obj == 1 else [first_share, 1.0 - first_share]
    centres: list[tuple[float, float]] = []
    for k, share in enumerate(shares):
        if k > 0:  # a second object: same rule, its own contrasting colour
            c_fg = _colour_pair_against(rng, c_bg, 0.45)
        shape = _random_shape(rng, 1.0, 0.0, 0.0, hole_p=0.2, stick_p=0.0)
        shape.radius = math.sqrt(total_area * share / shape.unit_area())
        _place(rng, shape, h, w, centres)
        centres.append((shape.cx, shape.cy))
        if rng.random() < 0.3:
            shape.add_sticks(rng, int(rng.integers(1, 4)))
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        c1 = _secondary(rng, c_fg)
        painted = _paint_shape(rng, img, shape, c_fg, c1, texture, rng.uniform(0.7, 1.8))
        if painted is not None:
            (by0, by1, bx0, bx1), alpha = painted
            np.maximum(mask[by0:by1, bx0:bx1], alpha, out=mask[by0:by1, bx0:bx1])

    if rng.random() < 0.5:  # sensor noise (luminance only: cheap)
        sigma = np.float32(rng.uniform(0.005, 0.03))
        img += (rng.standard_normal((h, w), dtype=np.float32) * sigma)[..., None]
    rgb = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return rgb, np.clip(mask * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _colour_pair_against(rng: np.random.Generator, c_bg: np.ndarray, min_dist: float) -> np.ndarray:
    for _ in range(64):
        c = _colour(rng)
        if _dist(c, c_bg) >= min_dist:
            return c
    return c  # pragma: no cover


# --------------------------------------------------------------------------- writing


def stem_for(index: int, stream: int = TRAIN_STREAM) -> str:
    return f"synth_{index:06d}" if stream == TRAIN_STREAM else f"synth_val_{index:06d}"


def write_sample(
    root: str | Path,
    seed: int,
    index: int,
    size: int | tuple[int, int] = 320,
    *,
    aspect_jitter: float = 0.0,
    stream: int = TRAIN_STREAM,
) -> float:
    """Write one image/mask pair under ``root/images`` and ``root/masks``; return fg fraction."""
    root = Path(root)
    rgb, mask = generate_sample(seed, index, size, aspect_jitter=aspect_jitter, stream=stream)
    stem = stem_for(index, stream)
    Image.fromarray(rgb).save(root / "images" / f"{stem}.jpg", "JPEG", quality=JPEG_QUALITY)
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png", "PNG")
    return float(mask.mean()) / 255.0


def _write_range(args: tuple) -> list[float]:
    root, seed, start, stop, size, aspect_jitter, stream = args
    return [
        write_sample(root, seed, i, size, aspect_jitter=aspect_jitter, stream=stream)
        for i in range(start, stop)
    ]


def _write_split(
    root: Path, seed, start, count, size, aspect_jitter, stream, workers
) -> list[float]:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    if workers <= 1 or count < 2:
        return _write_range((root, seed, start, start + count, size, aspect_jitter, stream))
    n_chunks = min(count, workers * 4)
    bounds = [start + (count * k) // n_chunks for k in range(n_chunks + 1)]
    jobs = [
        (root, seed, bounds[k], bounds[k + 1], size, aspect_jitter, stream) for k in range(n_chunks)
    ]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return [f for part in pool.map(_write_range, jobs) for f in part]


def write_dataset(
    output_dir: str | Path,
    count: int,
    seed: int,
    size: int | tuple[int, int] = 320,
    *,
    val_count: int = 0,
    aspect_jitter: float = 0.0,
    start: int = 0,
    workers: int = 1,
) -> dict[str, Any]:
    """Write ``count`` training samples (indices ``start .. start+count-1``) and ``val_count``
    validation samples (indices ``start .. start+val_count-1`` of the val stream, in ``DIR/val``).

    Returns a JSON-able summary (paths, counts, seconds, mean foreground fraction).
    """
    if count < 0 or val_count < 0 or start < 0 or seed < 0:
        raise ValueError("count, val_count, start and seed must be non-negative")
    if aspect_jitter < 0:
        raise ValueError("aspect_jitter must be >= 0")
    out = Path(output_dir)
    t0 = time.perf_counter()
    fractions = _write_split(out, seed, start, count, size, aspect_jitter, TRAIN_STREAM, workers)
    val_dir = out / "val"
    if val_count:
        fractions += _write_split(
            val_dir, seed, start, val_count, size, aspect_jitter, VAL_STREAM, workers
        )
    seconds = time.perf_counter() - t0
    total = count + val_count
    return {
        "output": str(out),
        "images": str(out / "images"),
        "masks": str(out / "masks"),
        "val": str(val_dir) if val_count else None,
        "count": count,
        "val_count": val_count,
        "seed": seed,
        "start": start,
        "size": size if isinstance(size, int) else list(size),
        "aspect_jitter": aspect_jitter,
        "seconds": round(seconds, 3),
        "ms_per_sample": round(1000.0 * seconds / total, 2) if total else None,
        "mean_fg_fraction": round(float(np.mean(fractions)), 4) if fractions else None,
    }


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--output", required=True, help="dataset root (images/, masks/ go here)")
    parser.add_argument("--count", type=int, required=True, help="number of training samples")
    parser.add_argument("--seed", type=int, required=True, help="non-negative random seed")
    parser.add_argument("--size", type=int, default=320, help="image side / long side (320)")
    parser.add_argument(
        "--val-count", type=int, default=0, help="validation samples, written to OUTPUT/val (0)"
    )
    parser.add_argument(
        "--aspect-jitter",
        type=float,
        nargs="?",
        const=0.5,
        default=0.0,
        metavar="J",
        help="vary aspect ratios: long/short uniform in [1, 1+J], long side = --size "
        "(flag alone: J=0.5; default off)",
    )
    parser.add_argument("--start", type=int, default=0, help="first sample index (sharding)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes (default 1, 0 = all cores); the output is identical for any value",
    )
    return parser


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    if parser is None:
        parser = argparse.ArgumentParser(
            prog="python -m jobs.make_dataset",
            description="Write a procedurally generated salient-object dataset "
            "(DUTS-style layout).",
        )
    return add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.seed < 0:
        print("make_dataset: --seed must be non-negative", file=sys.stderr)
        return 2
    if args.size < 16:
        print("make_dataset: --size must be at least 16", file=sys.stderr)
        return 2
    workers = args.workers if args.workers > 0 else (os.cpu_count() or 1)
    try:
        s = write_dataset(
            args.output,
            args.count,
            args.seed,
            args.size,
            val_count=args.val_count,
            aspect_jitter=args.aspect_jitter,
            start=args.start,
            workers=workers,
        )
    except ValueError as exc:
        print(f"make_dataset: {exc}", file=sys.stderr)
        return 2
    val = f" + {s['val_count']} val (in val/)" if s["val_count"] else ""
    print(
        f"make_dataset: wrote {s['count']} train{val} samples to {s['output']} "
        f"({s['size']}px, seed {s['seed']}, aspect jitter {s['aspect_jitter']}) "
        f"in {s['seconds']:.1f}s ({s['ms_per_sample']} ms/sample), "
        f"mean foreground {100 * (s['mean_fg_fraction'] or 0):.1f}%"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from jobs._common import job_main

    return job_main(add_arguments, run, "python -m jobs.make_dataset",
                    "Write a procedurally generated salient-object dataset (DUTS-style layout).", argv)


if __name__ == "__main__":
    sys.exit(main())
