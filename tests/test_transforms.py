"""Pre/post-processing against the official code's arithmetic; decoding of odd inputs; masks."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from u2net_core import decode_image, deep_supervision_loss, normalize, probabilities, to_uint8_map
from u2net_core.imageio import ImageDecodeError, decode_mask
from u2net_core.masks import (coverage_and_bbox, full_size_mask, rle_decode, rle_encode,
                              upsample_map)


def _official_to_tensor_lab(image: np.ndarray) -> np.ndarray:
    """The official ToTensorLab(flag=0) on an H×W×C float image in [0, 1]."""
    tmp = np.zeros((image.shape[0], image.shape[1], 3))
    image = image / np.max(image)
    if image.shape[2] == 1:
        for c in range(3):
            tmp[:, :, c] = (image[:, :, 0] - 0.485) / 0.229
    else:
        tmp[:, :, 0] = (image[:, :, 0] - 0.485) / 0.229
        tmp[:, :, 1] = (image[:, :, 1] - 0.456) / 0.224
        tmp[:, :, 2] = (image[:, :, 2] - 0.406) / 0.225
    return tmp.transpose(2, 0, 1)


def test_normalize_matches_official_rgb_and_gray():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 200, (2, 16, 16, 3), dtype=np.uint8)
    gray = np.repeat(rng.integers(0, 255, (1, 16, 16, 1), dtype=np.uint8), 3, axis=3)
    batch = np.concatenate([rgb, gray])
    out = normalize(batch, gray=[False, False, True]).numpy()
    for i in range(2):
        np.testing.assert_allclose(out[i], _official_to_tensor_lab(rgb[i] / 255.0), atol=1e-5)
    np.testing.assert_allclose(out[2], _official_to_tensor_lab(gray[0, :, :, :1] / 255.0), atol=1e-5)


def test_normalize_black_image_is_finite():
    out = normalize(np.zeros((1, 8, 8, 3), np.uint8))
    assert torch.isfinite(out).all()


def test_probabilities_and_uint8():
    logits = torch.tensor([[[[-100.0, 0.0], [2.0, 100.0]]]])
    p = probabilities(logits)
    assert to_uint8_map(p).tolist() == [[[0, 128], [225, 255]]]
    mm = probabilities(logits, "minmax")
    assert mm.min() == 0 and mm.max() == 1
    assert probabilities(torch.zeros(1, 1, 4, 4), "minmax").abs().sum() == 0  # no NaN
    with pytest.raises(ValueError):
        probabilities(logits, "bogus")


def test_loss_equals_official_bce_on_sigmoids():
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(2, 1, 12, 10, generator=g) * 3 for _ in range(7)]
    target = (torch.rand(2, 1, 12, 10, generator=g) > 0.5).float()
    total, fused = deep_supervision_loss(logits, target)
    bce = torch.nn.BCELoss(reduction="mean")
    ref = [bce(torch.sigmoid(d), target) for d in logits]
    torch.testing.assert_close(fused, ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total, sum(ref), atol=1e-5, rtol=1e-5)
    total2, _ = deep_supervision_loss(logits, target[:, 0])  # N×H×W targets too
    torch.testing.assert_close(total, total2)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_decode_modes_and_exif():
    rgb = Image.new("RGB", (64, 32), (200, 10, 10))
    d = decode_image(_encode(rgb, "PNG"), 20)
    assert d.array.shape == (20, 20, 3) and d.array.dtype == np.uint8
    assert (d.width, d.height, d.gray) == (64, 32, False)

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW on display: stored 64×32 shows as 32×64
    d = decode_image(_encode(rgb, "JPEG", exif=exif.tobytes()), 20)
    assert (d.width, d.height) == (32, 64)

    g16 = Image.fromarray((np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 30))
    d = decode_image(_encode(g16, "PNG"), 16)
    assert d.gray and d.array.max() == 255 and d.array.min() < 10  # scaled by max, not clipped

    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))
    d = decode_image(_encode(cmyk, "JPEG"), 8)
    assert d.array[..., 0].mean() > 200 and d.array[..., 1].mean() < 60  # red

    pal = Image.new("P", (10, 10))
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 0
    d = decode_image(_encode(pal, "PNG"), 4)
    assert not d.gray

    frames = [Image.new("RGB", (12, 12), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    d = decode_image(buf.getvalue(), 4)
    assert d.frames == 2 and d.array[..., 0].mean() > 200  # first frame (red)


@pytest.mark.parametrize("data,kind", [
    (b"", "EmptyInput"),
    (b"this is not an image at all", "NotAnImage"),
])
def test_decode_errors(data, kind):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert err.value.kind == kind


def test_decode_truncated_and_bomb():
    data = _encode(Image.effect_noise((200, 200), 50).convert("RGB"), "JPEG")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data[: len(data) // 2])
    assert err.value.kind in {"TruncatedImage", "CorruptImage"}
    big = _encode(Image.new("L", (3000, 2000)), "PNG")
    with pytest.raises(ImageDecodeError, match="megapixels") as err:
        decode_image(big, max_pixels=1_000_000)
    assert err.value.kind == "DecompressionBomb"


def test_decode_mask_is_raw_luminance():
    m = np.zeros((30, 30), np.uint8)
    m[10:20, 10:20] = 255
    out = decode_mask(_encode(Image.fromarray(m), "PNG"), None)
    np.testing.assert_array_equal(out, m)


def test_rle_round_trip_and_known_value():
    rng = np.random.default_rng(3)
    for shape in [(1, 1), (5, 7), (40, 33)]:
        m = rng.random(shape) > 0.6
        s = rle_encode(m)
        np.testing.assert_array_equal(rle_decode(s, *shape), m.astype(np.uint8))
    # pycocotools: encode(np.asfortranarray([[0,1],[1,1]])) counts == b'12'? column-major
    # runs are [1, 3] -> '1' + '3' shifted by 48 -> "13".
    assert rle_encode(np.array([[0, 1], [1, 1]], bool)) == "13"
    assert rle_encode(np.ones((2, 2), bool)) == "04"


def test_full_size_mask_coverage_and_bbox():
    prob = np.zeros((8, 8), np.uint8)
    prob[2:4, 4:6] = 255
    row = {"prob_map": prob.tobytes(), "map_height": 8, "map_width": 8, "width": 16, "height": 8}
    full = full_size_mask(row)
    assert full.shape == (8, 16)
    cov, box = coverage_and_bbox(full)
    assert 0 < cov < 0.2 and box["x0"] >= 7 and box["x1"] <= 12 and box["y0"] == 2 and box["y1"] == 3
    assert coverage_and_bbox(np.zeros((4, 4), np.uint8)) == (0.0, None)
    assert upsample_map(prob, 8, 8) is prob


def test_coverage_and_bbox_from_map_matches_full_size():
    from PIL import ImageFilter

    from u2net_core.masks import coverage_and_bbox_from_map

    rng = np.random.default_rng(5)
    for t in range(120):
        h = w = 320 if t % 2 else int(rng.integers(2, 64))
        m = np.zeros((h, w), np.uint8)
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        m[y0:y0 + rng.integers(1, h), x0:x0 + rng.integers(1, w)] = rng.integers(100, 256)
        m = np.asarray(Image.fromarray(m).filter(ImageFilter.GaussianBlur(rng.uniform(0, 5))))
        W, H = int(rng.integers(1, 2500)), int(rng.integers(1, 2500))
        cov, box = coverage_and_bbox(upsample_map(m, W, H))
        cov2, box2 = coverage_and_bbox_from_map(m, W, H)
        assert abs(cov - cov2) < 1e-5, (h, w, W, H)
        if box is None:
            assert box2 is None
        else:
            assert all(abs(box[k] - box2[k]) <= 1 for k in box), (box, box2)
