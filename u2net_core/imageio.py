"""Decode image bytes straight to the model's input: S×S uint8 RGB, EXIF-oriented.

One decoder for inference, training and evaluation, so every path sees the same pixels.
Why it looks like this:
- JPEG DCT-domain downscaling (`Image.draft`) decodes a 1080p JPEG at 1/2 or 1/4 scale, about
  3× cheaper than a full decode followed by a resize; the result differs from the full decode
  by about what re-encoding at q85 instead of q90 would.
- Every odd mode is mapped here, once: 16-bit and float images are scaled by their own maximum
  (the official code divides by the image max anyway, so this keeps all the precision uint8
  can hold), grayscale-like modes are flagged so normalisation can follow the official code,
  alpha is dropped as the official loader does (its `image[:, :, :3]`).
- Failures raise `ImageDecodeError` with a `kind` and a message a user can act on; the pipeline
  records them as data.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = ["DecodedImage", "ImageDecodeError", "decode_image", "decode_mask",
           "DEFAULT_MAX_PIXELS"]

# Pillow's own hard decompression-bomb limit (2 × Image.MAX_IMAGE_PIXELS at its default).
DEFAULT_MAX_PIXELS = 178_956_970

_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
# EXIF orientations 5–8 swap width and height.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}


class ImageDecodeError(ValueError):
    """An input that cannot become a model input. `kind` is a stable short name for tables."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class DecodedImage:
    array: np.ndarray  # S×S×3 uint8 (or H×W×3 when no size was asked for)
    width: int  # original width after EXIF orientation
    height: int  # original height after EXIF orientation
    gray: bool  # single-channel at the source: normalised as the official code does
    frames: int = 1  # >1 for animations; the first frame is used


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageDecodeError("EmptyInput", "empty input (0 bytes)")
    try:
        with warnings.catch_warnings():
            # We apply our own limit below; Pillow's warning would only be noise in logs.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("DecompressionBomb", str(exc)) from None
    except UnidentifiedImageError:
        head = data[:8].hex(" ")
        raise ImageDecodeError(
            "NotAnImage", f"not a recognised image format ({len(data)} bytes, starts {head})"
        ) from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError("InvalidSize", f"image has no pixels ({w}×{h})")
    if w * h > max_pixels:
        raise ImageDecodeError(
            "DecompressionBomb",
            f"image is {w}×{h} = {w * h / 1e6:.1f} megapixels, above the limit of "
            f"{max_pixels / 1e6:.1f} (raise --max-pixels if this input is legitimate)",
        )
    return img


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block must not cost the image
        return 1


def _load(img: Image.Image) -> None:
    # Truncated files must fail, not decode with a grey bottom half.
    assert not ImageFile.LOAD_TRUNCATED_IMAGES, "LOAD_TRUNCATED_IMAGES must stay False"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except OSError as exc:
        msg = str(exc)
        kind = "TruncatedImage" if "truncated" in msg.lower() else "CorruptImage"
        raise ImageDecodeError(kind, f"cannot decode image: {msg}") from None
    except (ValueError, SyntaxError, EOFError, IndexError) as exc:  # Pillow plugins raise these
        raise ImageDecodeError("CorruptImage", f"cannot decode image: {exc}") from None


def _scale_high_depth(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float32, copy=False)
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    arr = np.clip(arr, 0, None)
    peak = float(arr.max()) if arr.size else 0.0
    if peak <= 0:
        return np.zeros(arr.shape, np.uint8)
    return np.rint(arr * (255.0 / peak)).astype(np.uint8)


def _to_rgb_array(img: Image.Image, size: int | None) -> tuple[np.ndarray, bool]:
    mode = img.mode
    gray = mode in _GRAY_MODES
    if mode in _HIGH_DEPTH_MODES:
        f = Image.fromarray(np.asarray(img, dtype=np.float32))
        if size is not None:
            f = f.resize((size, size), Image.BILINEAR)
        plane = _scale_high_depth(np.asarray(f))
        return np.repeat(plane[:, :, None], 3, axis=2), True
    if gray:
        img = img.convert("L")
    elif mode != "RGB":
        img = img.convert("RGB")  # CMYK, P, RGBA, YCbCr, ...: alpha dropped as the official code
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img)
    if gray:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr), gray


def decode_image(data: bytes, size: int | None = 320, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft: bool = True) -> DecodedImage:
    """Bytes → `DecodedImage` with an S×S×3 uint8 array (first frame, EXIF orientation applied).

    `size=None` keeps the original resolution (after orientation). `draft=False` forces a full
    JPEG decode (the official-style path, for fidelity comparisons).
    """
    img = _open(data, max_pixels)
    frames = int(getattr(img, "n_frames", 1) or 1)
    orientation = _orientation(img)
    w, h = img.size
    if orientation in _TRANSPOSED_ORIENTATIONS:
        w, h = h, w
    if draft and size is not None and img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK"):
        img.draft(img.mode, (size, size))
    _load(img)
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    arr, gray = _to_rgb_array(img, size)
    return DecodedImage(arr, int(w), int(h), gray, frames)


def decode_mask(data: bytes, size: int | None = 320, *, max_pixels: int = DEFAULT_MAX_PIXELS
                ) -> np.ndarray:
    """Ground-truth mask bytes → S×S uint8 (0..255), orientation applied like the image's."""
    img = _open(data, max_pixels)
    orientation = _orientation(img)
    _load(img)
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode in _HIGH_DEPTH_MODES:
        arr = np.asarray(img, dtype=np.float32)
        f = Image.fromarray(arr)
        if size is not None:
            f = f.resize((size, size), Image.BILINEAR)
        return _scale_high_depth(np.asarray(f)) if arr.max() > 255 else np.clip(
            np.rint(np.asarray(f)), 0, 255).astype(np.uint8)
    if img.mode != "L":
        img = img.convert("L")  # RGB masks (a common export) → luminance
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(img))
