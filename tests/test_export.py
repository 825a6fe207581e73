"""ONNX export: same numbers as PyTorch and the official model, and loadable the way rembg does."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from u2net_core import build_model, decode_image, load_weights  # noqa: E402
from u2net_core.masks import upsample_map  # noqa: E402
from u2net_core.onnx_export import INPUT_NAME, OUTPUT_NAMES, export_onnx  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
WEIGHTS = FIXTURES / "u2netp_detweights.pth"
TOL = 1e-4


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    # The deterministic weights the official model's reference outputs were made with.
    return load_weights(build_model("u2netp"), WEIGHTS).eval()


@pytest.fixture(scope="module")
def dynamic_onnx(model, tmp_path_factory) -> str:
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "u2netp.onnx")


def _session(path: str):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def dynamic_session(dynamic_onnx):
    return _session(dynamic_onnx)


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_file_passes_checker_and_declares_dynamic_interface(dynamic_onnx):
    onnx.checker.check_model(dynamic_onnx, full_check=True)
    graph = onnx.load(dynamic_onnx).graph
    assert [i.name for i in graph.input] == [INPUT_NAME]
    assert _dims(graph.input[0]) == ["batch", 3, "height", "width"]
    assert [o.name for o in graph.output] == list(OUTPUT_NAMES)
    assert all(_dims(o) == ["batch", 1, "height", "width"] for o in graph.output)


@pytest.mark.parametrize("shape", [(1, 3, 96, 96), (3, 3, 96, 96), (2, 3, 100, 140)])
def test_onnx_runtime_matches_pytorch_sigmoid_maps(model, dynamic_session, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.inference_mode():
        logits = model(x)
    expected = [torch.sigmoid(t).numpy() for t in logits]
    got = dynamic_session.run(None, {INPUT_NAME: x.numpy()})
    assert len(got) == 7
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape == (shape[0], 1, *shape[2:])
        assert float(np.abs(a - b).max()) < TOL, f"d{i}"
    fused = got[0]
    assert fused.min() >= 0.0 and fused.max() <= 1.0
    # The first output is the fused map, not a side output (they differ well beyond TOL).
    assert float(np.abs(fused - expected[1]).max()) > 100 * TOL


def test_onnx_reproduces_official_reference_outputs(dynamic_session):
    ref = torch.load(FIXTURES / "u2netp_reference_outputs.pt", weights_only=True)
    got = dynamic_session.run(None, {INPUT_NAME: ref["x"].numpy()})
    for a, b in zip(got, ref["outputs"]):  # the official forward: sigmoid maps, fused first
        assert float(np.abs(a - b.numpy()).max()) < TOL


# --- rembg's u2net_custom session, re-enacted (rembg is not a dependency) --------------------

def _rembg_u2net_custom_mask(session, img: Image.Image) -> np.ndarray:
    """What rembg's `BaseSession.normalize` + `U2netCustomSession.predict` do, step by step."""
    im = img.convert("RGB").resize((320, 320), Image.Resampling.LANCZOS)
    arr = np.array(im)
    arr = arr / max(np.max(arr), 1e-6)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tmp = np.zeros((arr.shape[0], arr.shape[1], 3))
    for c in range(3):
        tmp[:, :, c] = (arr[:, :, c] - mean[c]) / std[c]
    feed = {session.get_inputs()[0].name: np.expand_dims(tmp.transpose((2, 0, 1)), 0).astype(np.float32)}
    pred = session.run(None, feed)[0][:, 0, :, :]
    pred = np.squeeze((pred - np.min(pred)) / (np.max(pred) - np.min(pred)))
    mask = Image.fromarray((pred * 255).astype("uint8"), mode="L")
    return np.asarray(mask.resize(img.size, Image.Resampling.LANCZOS))


def _scene(width: int, height: int) -> bytes:
    """A red ellipse on a colour gradient, with a little noise; PNG (no JPEG draft decoding)."""
    rng = np.random.default_rng(width * height)
    yy, xx = np.mgrid[0:height, 0:width]
    bg = np.stack([80 + 60 * xx / width, 120 + 40 * yy / height, 160 - 50 * xx / width], -1)
    blob = ((xx - width * 0.55) / (width * 0.22)) ** 2 + ((yy - height * 0.45) / (height * 0.3)) ** 2 < 1
    img = np.where(blob[..., None], np.array([230, 60, 40]), bg) + rng.normal(0, 4, bg.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _pipeline_minmax_mask(predictor, data: bytes) -> np.ndarray:
    """Our pipeline's path: decode stage, the model actor's `predict_uint8`, the reader helper."""
    decoded = decode_image(data, 320)
    prob_map = predictor.predict_uint8(decoded.array[None].copy(), np.array([decoded.gray]))[0]
    return upsample_map(prob_map, decoded.width, decoded.height)


def test_rembg_u2net_custom_code_path_matches_pipeline(dynamic_session):
    from pipeline.config import ModelConfig
    from pipeline.predict import U2NetPredictor

    session = dynamic_session
    predictor = U2NetPredictor(ModelConfig(name="u2netp", normalize="minmax", batch_size=1,
                                           precision="fp32"),
                               torch.load(WEIGHTS, weights_only=True))

    # At 320×320 no resampling happens on either side: only rembg's truncation to uint8
    # against our rounding separates the two, so they agree to one grey level.
    square = _scene(320, 320)
    theirs = _rembg_u2net_custom_mask(session, Image.open(io.BytesIO(square)))
    ours = _pipeline_minmax_mask(predictor, square)
    assert theirs.shape == ours.shape == (320, 320)
    diff = np.abs(theirs.astype(int) - ours.astype(int))
    assert diff.max() <= 1
    assert ours.min() == 0 and ours.max() == 255  # min-max normalised, so the check has teeth

    # Elsewhere rembg resamples with Lanczos and we with bilinear (input and mask): close, not equal.
    wide = _scene(480, 360)
    theirs = _rembg_u2net_custom_mask(session, Image.open(io.BytesIO(wide)))
    ours = _pipeline_minmax_mask(predictor, wide)
    assert theirs.shape == ours.shape == (360, 480)
    diff = np.abs(theirs.astype(int) - ours.astype(int))
    assert diff.mean() < 6 and np.percentile(diff, 99) < 24


# --- the job -------------------------------------------------------------------------------

def test_export_job_static_hw_writes_a_verified_file(tmp_path, capsys):
    from jobs import export

    out = tmp_path / "nested" / "u2netp-64.onnx"
    rc = export.main(["--model", "u2netp", "--weights", str(WEIGHTS), "--onnx", str(out),
                      "--input-size", "64", "--static-hw"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["onnx"] == str(out) and summary["bytes"] == out.stat().st_size
    assert summary["verified"]["max_abs_diff"] < TOL
    assert summary["verified"]["shapes"] == ["1x3x64x64", "2x3x64x64"]  # two batch sizes
    session = _session(str(out))
    assert session.get_inputs()[0].shape == ["batch", 3, 64, 64]
    fused = session.run(None, {INPUT_NAME: np.zeros((2, 3, 64, 64), np.float32)})[0]
    assert fused.shape == (2, 1, 64, 64)
    with pytest.raises(Exception):  # static spatial axes really are static
        session.run(None, {INPUT_NAME: np.zeros((1, 3, 96, 96), np.float32)})
    assert not any(p.name.startswith(".tmp") for p in out.parent.iterdir())


def test_export_job_errors_are_one_line(tmp_path, capsys):
    from jobs import export

    out = tmp_path / "x.onnx"
    assert export.main(["--model", "u2netp", "--weights", str(tmp_path / "missing.pth"),
                        "--onnx", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    # u2netp weights into u2net: a weights mismatch, reported without a traceback.
    assert export.main(["--model", "u2net", "--weights", str(WEIGHTS), "--onnx", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "shape mismatches" in err and "Traceback" not in err
    assert not out.exists()


def test_export_job_keeps_an_unverified_file_away_from_the_destination(tmp_path, monkeypatch, capsys):
    from jobs import export
    from u2net_core import onnx_export

    monkeypatch.setattr(onnx_export, "max_abs_diff_vs_torch", lambda *a, **k: float("nan"))
    out = tmp_path / "bad.onnx"
    assert export.main(["--model", "u2netp", "--weights", str(WEIGHTS), "--onnx", str(out),
                        "--input-size", "32", "--static-hw"]) == 1
    assert "not trustworthy" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_interface(model, tmp_path):
    pytest.importorskip("onnxscript")  # not a project dependency: the default exporter needs none
    path = export_onnx(model, tmp_path / "dynamo.onnx", exporter="dynamo")
    graph = onnx.load(path).graph
    assert _dims(graph.input[0]) == ["batch", 3, "height", "width"]
    assert [o.name for o in graph.output] == list(OUTPUT_NAMES)
    x = torch.randn(2, 3, 100, 140, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = torch.sigmoid(model(x)[0]).numpy()
    assert float(np.abs(_session(path).run(None, {INPUT_NAME: x.numpy()})[0] - expected).max()) < TOL
