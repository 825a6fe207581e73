"""The bad-input corpus (tests/corpus.py) keeps its own promises, checked with plain Pillow."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from tests.corpus import BOMB_SIZE, ERROR, OK, expected_outcomes, write_bad_inputs

PILLOW_DEFAULT_MAX_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)  # Image.MAX_IMAGE_PIXELS default


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad_inputs")
    return directory, write_bad_inputs(directory)


@pytest.fixture(autouse=True)
def pillow_defaults(monkeypatch):
    # Other code in the process may have relaxed these globals; the corpus is defined against
    # Pillow's defaults.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_DEFAULT_MAX_PIXELS)


def _decode(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        out = ImageOps.exif_transpose(im)
        return out.convert("RGB")


def test_layout_and_required_cases(corpus):
    directory, exp = corpus
    assert set(exp) == {p.name for p in directory.iterdir()}
    for name, e in exp.items():
        assert e["outcome"] in (OK, ERROR), name
        if e["outcome"] == OK:
            assert isinstance(e["width"], int) and isinstance(e["height"], int), name
        else:
            assert e["width"] is None and e["height"] is None, name
    required = {
        "jpeg_corrupt.jpg", "jpeg_truncated.jpg", "png_truncated.png", "empty.jpg",
        "not_an_image.png", "bomb.png", "huge_legal.jpg", "cmyk.jpg", "gray16.png", "rgb16.png",
        "gray.jpg", "palette_transparency.png", "rgba.png", "la.png", "exif_rotated.jpg",
        "animated.gif", "one_by_one.png", "image.bmp", "image.tiff", "all_black.png",
        "tiny_2x2.jpg",
    }  # fmt: skip
    assert required <= set(exp)
    plain = expected_outcomes(exp)
    assert plain["bomb.png"] == ERROR and plain["cmyk.jpg"] == OK


def test_error_files_fail_to_decode(corpus):
    directory, exp = corpus
    raised = {}
    for name, e in exp.items():
        if e["outcome"] != ERROR:
            continue
        with pytest.raises(Exception) as info:  # noqa: PT011 - any decode failure counts
            _decode(directory / name)
        raised[name] = info.type
    assert raised["empty.jpg"] is Image.UnidentifiedImageError
    assert raised["not_an_image.png"] is Image.UnidentifiedImageError
    assert raised["bomb.png"] is Image.DecompressionBombError
    assert issubclass(raised["jpeg_truncated.jpg"], OSError)
    assert issubclass(raised["jpeg_corrupt.jpg"], OSError)
    assert issubclass(raised["png_truncated.png"], OSError)
    assert raised["png_bad_ihdr_crc.png"] is Image.UnidentifiedImageError
    # Documented in corpus.py: a broken PNG chunk structure is a SyntaxError, not an OSError.
    assert issubclass(raised["png_bad_idat_length.png"], SyntaxError)
    assert not issubclass(raised["png_bad_idat_length.png"], OSError)


def test_bomb_raises_at_open_time(corpus):
    directory, _ = corpus
    with pytest.raises(Image.DecompressionBombError):
        Image.open(directory / "bomb.png")


def test_bomb_is_a_real_small_png(corpus):
    directory, _ = corpus
    data = (directory / "bomb.png").read_bytes()
    assert len(data) < 100_000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == BOMB_SIZE
    assert width * height > 2 * PILLOW_DEFAULT_MAX_PIXELS
    # The IDAT really inflates to the full image (rows of filter byte + packed zero bits).
    (idat_len,) = struct.unpack(">I", data[33:37])
    assert data[37:41] == b"IDAT"
    inflater = zlib.decompressobj()
    total, pending = 0, data[41 : 41 + idat_len]
    while pending:
        chunk = inflater.decompress(pending, 1 << 24)
        assert not chunk.strip(b"\x00")
        total += len(chunk)
        pending = inflater.unconsumed_tail
    assert total == height * (1 + (width + 7) // 8)


def test_ok_files_decode_with_expected_size(corpus):
    directory, exp = corpus
    for name, e in exp.items():
        if e["outcome"] != OK:
            continue
        rgb = _decode(directory / name)
        assert rgb.size == (e["width"], e["height"]), name
        arr = np.asarray(rgb, dtype=np.float32)
        assert arr.shape == (e["height"], e["width"], 3), name
        assert np.isfinite(arr).all(), name


def test_exif_rotation_changes_the_size(corpus):
    directory, exp = corpus
    with Image.open(directory / "exif_rotated.jpg") as im:
        assert im.getexif().get(0x0112) == 6
        stored = im.size
    assert stored == (exp["exif_rotated.jpg"]["height"], exp["exif_rotated.jpg"]["width"])
    assert stored[0] != stored[1]


def test_special_modes_are_what_they_claim(corpus):
    directory, exp = corpus
    modes = {}
    for name in ("cmyk.jpg", "gray.jpg", "gray16.png", "rgb16.png", "palette_transparency.png",
                 "rgba.png", "la.png"):  # fmt: skip
        with Image.open(directory / name) as im:
            modes[name] = im.mode
            if name == "palette_transparency.png":
                assert "transparency" in im.info
    assert modes["cmyk.jpg"] == "CMYK"
    assert modes["gray.jpg"] == "L"
    assert modes["gray16.png"] in ("I;16", "I")
    assert modes["rgb16.png"] == "RGB"
    assert modes["palette_transparency.png"] == "P"
    assert modes["rgba.png"] == "RGBA"
    assert modes["la.png"] == "LA"
    assert (directory / "rgb16.png").read_bytes()[24] == 16  # IHDR bit depth
    for name in ("animated.gif", "animated.webp"):
        if name in exp:
            with Image.open(directory / name) as im:
                assert getattr(im, "n_frames", 1) == 3, name
    with Image.open(directory / "all_black.png") as im:
        assert im.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_tolerated_damage_is_really_tolerated(corpus):
    directory, _ = corpus
    original = (directory / "mislabelled.jpg").read_bytes()  # the undamaged PNG
    assert (directory / "png_missing_iend.png").read_bytes() == original[:-12]
    bad_crc = (directory / "png_bad_idat_crc.png").read_bytes()
    assert len(bad_crc) == len(original) and bad_crc != original
    assert np.array_equal(
        np.asarray(_decode(directory / "png_bad_idat_crc.png")),
        np.asarray(_decode(directory / "mislabelled.jpg")),
    )
    # The silently-decoded JPEG is visibly damaged; here it only has to decode to real pixels.
    arr = np.asarray(_decode(directory / "jpeg_garbage_silent.jpg"))
    assert arr.std() > 0


def test_corpus_is_small_and_deterministic(corpus, tmp_path):
    directory, exp = corpus
    total = sum(p.stat().st_size for p in directory.iterdir())
    assert total < 3 * 1024 * 1024
    again = write_bad_inputs(tmp_path)
    assert again == exp
    for name in exp:
        assert (tmp_path / name).read_bytes() == (directory / name).read_bytes(), name
