"""Bad-input corpus for the pipeline tests.

``write_bad_inputs(directory)`` writes a small set of awkward image files (about 0.9 MB on disk,
well under a second to write) and returns what the pipeline must do with each one::

    {relative_filename: {"outcome": "ok" | "error", "width": int | None, "height": int | None,
                         "note": str}}

* ``"ok"``: the file must yield a mask.  ``width``/``height`` are the image size *after* EXIF
  orientation (``ImageOps.exif_transpose``), i.e. the size the mask must have.
* ``"error"``: the file must be recorded in the errors table (and must not stop the run).
  ``width``/``height`` are ``None``.

The rule for deciding the outcome is "what Pillow does with its default settings":
a file is ``"error"`` exactly when ``Image.open(path)`` + ``.load()`` raises with
``ImageFile.LOAD_TRUNCATED_IMAGES = False`` and the default ``Image.MAX_IMAGE_PIXELS``.
Pillow silently tolerates some damage; those files are deliberately included as ``"ok"``
(``jpeg_garbage_silent.jpg``, ``png_bad_idat_crc.png``, ``png_missing_iend.png``), because the
pipeline can only be as strict as its decoder.  ``tests/test_corpus.py`` checks every promise
made here against plain Pillow.

Note for pipeline code: decoding failures surface as *different* exception types:
``UnidentifiedImageError`` (zero-byte / non-image / bad header), ``OSError`` ("image file is
truncated", "broken data stream"), ``SyntaxError`` (PNG chunk structure broken mid-file: not an
``OSError``!) and ``Image.DecompressionBombError`` (raised by ``Image.open`` itself, before any
decoding).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import TypedDict

import numpy as np
from PIL import Image, features

OK = "ok"
ERROR = "error"

# Pillow raises DecompressionBombError above 2 * MAX_IMAGE_PIXELS (2 * 89_478_485 ≈ 179 MP by
# default).  The bomb claims 20000 x 20000 = 400 MP, is a valid PNG (1-bit, all zero) and is ~49 KB.
BOMB_SIZE = (20000, 20000)
HUGE_LEGAL_SIZE = (6000, 4000)  # 24 MP: above typical inputs, below every limit.


class Expectation(TypedDict):
    outcome: str
    width: int | None
    height: int | None
    note: str


# ----------------------------------------------------------------------------- helpers


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    """A deterministic RGB uint8 test picture: gradients plus a bright disc off-centre."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u = xx / max(width - 1, 1)
    v = yy / max(height - 1, 1)
    img = np.stack([255 * u, 255 * v, 255 * (1 - u) * (1 - v)], axis=-1)
    cx, cy = width * 0.35, height * 0.4
    r = 0.25 * min(width, height)
    disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
    img[disc] = rng.integers(150, 256, 3)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_from_rows(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _bomb_png(width: int, height: int) -> bytes:
    """A real, valid 1-bit grayscale all-zero PNG, streamed so nothing big is ever in memory."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0 + packed zero bits
    comp = zlib.compressobj(9)
    parts = []
    block = 1000
    for start in range(0, height, block):
        parts.append(comp.compress(row * min(block, height - start)))
    parts.append(comp.flush())
    return _png_from_rows(width, height, 1, 0, b"".join(parts))


def _rgb16_png(arr16: np.ndarray) -> bytes:
    """48-bit RGB PNG (Pillow has no 16-bit-per-channel RGB mode to write one)."""
    h, w, _ = arr16.shape
    rows = np.concatenate(
        [np.zeros((h, 1), np.uint8), arr16.astype(">u2").view(np.uint8).reshape(h, w * 6)], axis=1
    )
    return _png_from_rows(w, h, 16, 2, zlib.compress(rows.tobytes(), 9))


def _scan_bounds(jpeg: bytes) -> tuple[int, int]:
    """(first byte of entropy-coded data, index of the EOI marker) of a baseline JPEG."""
    sos = jpeg.index(b"\xff\xda")
    (length,) = struct.unpack(">H", jpeg[sos + 2 : sos + 4])
    return sos + 2 + length, len(jpeg) - 2


# ----------------------------------------------------------------------------- the corpus


def write_bad_inputs(directory: str | Path) -> dict[str, Expectation]:
    """Write the corpus into ``directory`` (created if needed); return the expectations."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240611)
    result: dict[str, Expectation] = {}

    def put(name: str, data: bytes, outcome: str, size: tuple[int, int] | None, note: str) -> None:
        (out / name).write_bytes(data)
        w, h = size if size is not None else (None, None)
        result[name] = Expectation(outcome=outcome, width=w, height=h, note=note)

    def ok(name: str, data: bytes, size: tuple[int, int], note: str) -> None:
        put(name, data, OK, size, note)

    def err(name: str, data: bytes, note: str) -> None:
        put(name, data, ERROR, None, note)

    base = _pattern(160, 120, seed=1)
    base_img = Image.fromarray(base)
    jpeg = _encode(base_img, "JPEG", quality=90)
    scan_start, scan_end = _scan_bounds(jpeg)
    mid = (scan_start + scan_end) // 2

    # --- damaged / non-image files: "error" -------------------------------------------------
    # Random garbage in the middle of the entropy-coded data.  libjpeg only gives up when it
    # meets a marker it cannot accept inside a scan; a stray SOI is one, so the garbage carries
    # one explicitly (random bytes alone fail or pass depending on whether they contain 0xFF).
    garbage = bytearray(rng.integers(0, 255, 256, dtype=np.uint8).tobytes())  # no 0xFF
    garbage[100:102] = b"\xff\xd8"
    err(
        "jpeg_corrupt.jpg",
        jpeg[:mid] + bytes(garbage) + jpeg[mid + len(garbage) :],
        "garbage (with a stray SOI marker) over the middle of the scan: 'broken data stream'",
    )
    err("jpeg_truncated.jpg", jpeg[: len(jpeg) // 2], "cut at half: 'image file is truncated'")
    err("empty.jpg", b"", "zero bytes: UnidentifiedImageError")
    err(
        "not_an_image.png",
        b"This is not a PNG file.\nIt is plain text with a .png extension.\n" * 4,
        "text with a .png extension: UnidentifiedImageError",
    )
    png = _encode(base_img, "PNG")
    err("png_truncated.png", png[: len(png) // 2], "cut at half: 'image file is truncated'")
    ihdr_crc = png.index(b"IHDR") + 4 + 13
    bad_crc = bytearray(png)
    bad_crc[ihdr_crc] ^= 0xFF
    err(
        "png_bad_ihdr_crc.png",
        bytes(bad_crc),
        "IHDR CRC mismatch: UnidentifiedImageError at open",
    )
    idat = png.index(b"IDAT") - 4
    (idat_len,) = struct.unpack(">I", png[idat : idat + 4])
    err(
        "png_bad_idat_length.png",
        png[:idat] + struct.pack(">I", idat_len - 1000) + png[idat + 4 :],
        "IDAT length field 1000 too small: load() raises SyntaxError('broken PNG file'), "
        "which is not an OSError",
    )
    err(
        "bomb.png",
        _bomb_png(*BOMB_SIZE),
        f"valid all-zero 1-bit PNG claiming {BOMB_SIZE[0]}x{BOMB_SIZE[1]} (400 MP) in ~50 KB: "
        "Image.open raises DecompressionBombError (> 2 x MAX_IMAGE_PIXELS)",
    )

    # --- damaged but tolerated by Pillow: "ok" ----------------------------------------------
    silent = rng.integers(0, 255, 256, dtype=np.uint8).tobytes()  # no 0xFF -> no markers
    ok(
        "jpeg_garbage_silent.jpg",
        jpeg[:mid] + silent + jpeg[mid + len(silent) :],
        base_img.size,
        "garbage without 0xFF bytes over the scan: decodes silently (with visible damage)",
    )
    idat_crc = idat + 8 + idat_len
    bad_idat_crc = bytearray(png)
    bad_idat_crc[idat_crc] ^= 0xFF
    ok(
        "png_bad_idat_crc.png",
        bytes(bad_idat_crc),
        base_img.size,
        "IDAT CRC mismatch (pixel data intact): Pillow does not check IDAT CRCs",
    )
    ok(
        "png_missing_iend.png",
        png[:-12],
        base_img.size,
        "IEND chunk cut off (all pixel data present): decodes silently",
    )

    # --- legal but awkward images: "ok" -------------------------------------------------------
    w, h = HUGE_LEGAL_SIZE
    xs = np.linspace(0, 255, w, dtype=np.float32).astype(np.uint8)
    ys = np.linspace(0, 255, h, dtype=np.float32).astype(np.uint8)
    huge = np.empty((h, w, 3), np.uint8)
    huge[..., 0] = xs[None, :]
    huge[..., 1] = ys[:, None]
    huge[..., 2] = 96
    huge[h // 4 : h // 2, w // 3 : w // 2] = (240, 240, 32)
    ok(
        "huge_legal.jpg",
        _encode(Image.fromarray(huge), "JPEG", quality=30),
        (w, h),
        "24 MP RGB JPEG: large but under every pixel limit",
    )
    del huge

    size = base_img.size
    ok("cmyk.jpg", _encode(base_img.convert("CMYK"), "JPEG", quality=90), size, "CMYK JPEG")
    ok("gray.jpg", _encode(base_img.convert("L"), "JPEG", quality=90), size, "grayscale JPEG")
    ok("tiny_2x2.jpg", _encode(Image.fromarray(base[:2, :2]), "JPEG"), (2, 2), "2x2 JPEG")
    ok("one_by_one.png", _encode(Image.fromarray(base[:1, :1]), "PNG"), (1, 1), "1x1 RGB PNG")
    ok(
        "all_black.png",
        _encode(Image.new("RGB", (64, 48)), "PNG"),
        (64, 48),
        "all-zero RGB: max-normalisation must not divide by zero / produce NaN",
    )
    ok(
        "all_black.jpg",
        _encode(Image.new("RGB", (64, 48)), "JPEG", quality=90),
        (64, 48),
        "all-zero RGB JPEG",
    )

    gray16 = (np.linspace(0, 65535, 120 * 160).reshape(120, 160)).astype(np.uint16)
    ok(
        "gray16.png",
        _encode(Image.fromarray(gray16), "PNG"),
        (160, 120),
        "16-bit grayscale PNG, full-range ramp (Pillow mode I;16; note that a bare "
        ".convert('RGB') clips it: every value above 255 becomes white)",
    )
    rgb16 = base.astype(np.uint16) * 257
    ok(
        "rgb16.png",
        _rgb16_png(rgb16),
        (160, 120),
        "48-bit RGB PNG, hand-written (Pillow reads it as 8-bit RGB)",
    )

    pal = base_img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    ok(
        "palette_transparency.png",
        _encode(pal, "PNG", transparency=0),
        base_img.size,
        "palette PNG with a transparent index (mode P + tRNS)",
    )
    rgba = base_img.convert("RGBA")
    alpha = np.full((120, 160), 255, np.uint8)
    alpha[:, :40] = 0
    alpha[:, 40:80] = 128
    rgba.putalpha(Image.fromarray(alpha))
    ok("rgba.png", _encode(rgba, "PNG"), base_img.size, "RGBA PNG with transparent/half alpha")
    la = base_img.convert("LA")
    la.putalpha(Image.fromarray(alpha))
    ok("la.png", _encode(la, "PNG"), base_img.size, "grayscale + alpha PNG (mode LA)")

    # Stored 160x120 with orientation 6 ("rotate 90 CW to display"): displayed 120x160.
    exif = Image.Exif()
    exif[0x0112] = 6
    ok(
        "exif_rotated.jpg",
        _encode(base_img, "JPEG", quality=90, exif=exif.tobytes()),
        (base_img.height, base_img.width),
        "EXIF orientation 6: stored 160x120, mask must be 120x160",
    )
    ok(
        "mislabelled.jpg",
        png,
        base_img.size,
        "a PNG file with a .jpg extension (Pillow sniffs content)",
    )

    frames = [Image.fromarray(np.roll(base, 30 * i, axis=1)) for i in range(3)]
    ok(
        "animated.gif",
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
        base_img.size,
        "3-frame animated GIF (first frame is used)",
    )
    ok("image.bmp", _encode(base_img, "BMP"), base_img.size, "24-bit BMP")
    ok("image.tiff", _encode(base_img, "TIFF", compression="tiff_deflate"), base_img.size, "TIFF")
    if features.check("webp"):
        ok("still.webp", _encode(base_img, "WEBP", quality=80), base_img.size, "still WebP")
        try:
            anim = _encode(
                frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, quality=60
            )
        except Exception:  # pragma: no cover - Pillow without animated WebP support
            anim = None
        if anim is not None:
            ok("animated.webp", anim, base_img.size, "3-frame animated WebP (first frame is used)")

    return result


def expected_outcomes(corpus: dict[str, Expectation]) -> dict[str, str]:
    """{filename: "ok" | "error"}: the plain form of ``write_bad_inputs``' return value."""
    return {name: exp["outcome"] for name, exp in corpus.items()}


if __name__ == "__main__":  # pragma: no cover - manual inspection helper
    import sys
    import tempfile

    target = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="bad_inputs_")
    for name, exp in sorted(write_bad_inputs(target).items()):
        size = (Path(target) / name).stat().st_size
        print(f"{exp['outcome']:5} {size:9d} B  {name:26} {exp['note']}")
    print(target)
