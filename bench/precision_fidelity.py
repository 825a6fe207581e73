"""Fidelity and CPU cost of every model mode against fp32 eager, on a trained model.

    python bench/precision_fidelity.py --weights tests/fixtures/u2netp_synth_trained.pth \\
        --input-size 96 --count 32 --modes fp32,bf16,int8,fp32+compile,bf16+compile

A mode is a precision (`fp32`, `bf16`, `int8`), optionally `+compile` (torch.compile). For each:
mean and max absolute difference of the uint8 maps against fp32 eager, the change in MAE and
max Fβ (SODMetrics) on make_dataset images the model was not trained on, CPU time per image
(all threads), and the one-off set-up time (quantisation, compilation). int8 is calibrated on
make_dataset images of yet another seed. `tests/test_precision.py` enforces the bounds
recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_MODES = ("fp32", "bf16", "int8")
EVAL_SEED, CALIBRATION_SEED = 4242, 777


def sample_jpegs(seed: int, count: int, input_size: int) -> list[tuple[bytes, np.ndarray]]:
    """make_dataset samples at twice `input_size`, as JPEG (q90) file bytes, with their masks."""
    from PIL import Image

    from jobs.make_dataset import generate_sample

    out = []
    for i in range(count):
        rgb, mask = generate_sample(seed, i, input_size * 2)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
        out.append((buf.getvalue(), mask))
    return out


def eval_set(count: int, input_size: int):
    """The evaluation images as the pipeline's decode gives them (uint8, N×S×S×3), the files'
    bytes they came from (a job fed those files decodes the same arrays), and the masks at the
    input size."""
    from PIL import Image

    from u2net_core.imageio import decode_image

    samples = sample_jpegs(EVAL_SEED, count, input_size)
    images = np.stack([decode_image(data, input_size).array for data, _ in samples])
    gts = [np.asarray(Image.fromarray(m).resize((input_size, input_size), Image.BILINEAR))
           for _, m in samples]
    return images, [data for data, _ in samples], gts


def calibration_set(count: int, input_size: int):
    """The int8 calibration images: decoded, and as file bytes (for a job's `--calibration`
    folder, read in name order, which then quantises exactly as `fidelity` does)."""
    from u2net_core.imageio import decode_image

    files = [data for data, _ in sample_jpegs(CALIBRATION_SEED, count, input_size)]
    return np.stack([decode_image(data, input_size).array for data in files]), files


def map_stats(maps: np.ndarray, reference: np.ndarray, gts) -> dict:
    """uint8 maps of one mode against the fp32 reference maps and the ground truth."""
    from u2net_core import SODMetrics

    m = SODMetrics()
    for p, g in zip(maps, gts):
        m.update(p, g)
    res = m.compute()
    diff = np.abs(maps.astype(np.int16) - reference.astype(np.int16))
    return {"mae": res["mae"], "max_f": res["max_f"], "mean_abs_diff_u8": float(diff.mean()),
            "max_abs_diff_u8": int(diff.max()), "pixels_differing": float((diff > 0).mean())}


def fidelity(weights: str, model: str = "u2netp", input_size: int = 128, count: int = 32,
             modes=DEFAULT_MODES, batch_size: int = 8, calibration_count: int = 32) -> dict:
    import torch

    from pipeline.config import ModelConfig
    from pipeline.predict import U2NetPredictor
    from u2net_core.runtime import cpu_has_native_bf16

    batch, _, gts = eval_set(count, input_size)
    gray = np.zeros(count, bool)
    calibration = None
    if any(m.startswith("int8") for m in modes):
        calibration = (calibration_set(calibration_count, input_size)[0],
                       np.zeros(calibration_count, bool))
    modes = ["fp32"] + [m for m in modes if m != "fp32"]  # the reference comes first
    out: dict = {"count": count, "input_size": input_size, "model": model, "batch_size": batch_size,
                 "torch_threads": torch.get_num_threads(), "cpu_native_bf16": cpu_has_native_bf16(),
                 "modes": {}}
    maps = {}
    for mode in modes:
        precision, _, extra = mode.partition("+")
        cfg = ModelConfig(name=model, weights=weights, input_size=input_size, batch_size=batch_size,
                          precision=precision, compile=extra == "compile")
        t0 = time.perf_counter()
        pred = U2NetPredictor(cfg, weights, device="cpu", threads=torch.get_num_threads(),
                              calibration=calibration)
        pred.predict_uint8(batch[:batch_size], gray[:batch_size])  # warm-up (and compilation)
        setup = time.perf_counter() - t0
        t0 = time.process_time()
        maps[mode] = pred.predict_uint8(batch, gray)
        cpu = (time.process_time() - t0) / count
        out["modes"][mode] = {"cpu_ms_per_image": round(cpu * 1000, 1), "setup_s": round(setup, 1),
                              **map_stats(maps[mode], maps["fp32"], gts)}
    base = out["modes"]["fp32"]
    for r in out["modes"].values():
        r["delta_mae"] = r["mae"] - base["mae"]
        r["delta_max_f"] = r["max_f"] - base["max_f"]
    out["maps"] = maps  # for callers that compare other runs against the same reference
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--model", default="u2netp")
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES))
    ap.add_argument("--report", default=None)
    args = ap.parse_args(argv)
    report = fidelity(args.weights, args.model, args.input_size, args.count,
                      modes=args.modes.split(","), batch_size=args.batch_size)
    report.pop("maps")
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        Path(args.report).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
