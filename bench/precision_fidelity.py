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


def _images(seed: int, count: int, input_size: int):
    """make_dataset samples through JPEG and the pipeline's own decode, with their masks."""
    from PIL import Image

    from jobs.make_dataset import generate_sample
    from u2net_core.imageio import decode_image

    images, gts = [], []
    for i in range(count):
        rgb, mask = generate_sample(seed, i, input_size * 2)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
        images.append(decode_image(buf.getvalue(), input_size).array)
        gts.append(np.asarray(Image.fromarray(mask).resize((input_size, input_size), Image.BILINEAR)))
    return np.stack(images), gts


def fidelity(weights: str, model: str = "u2netp", input_size: int = 128, count: int = 32,
             modes=DEFAULT_MODES, batch_size: int = 8, calibration_count: int = 32) -> dict:
    import torch

    from pipeline.config import ModelConfig
    from pipeline.predict import U2NetPredictor
    from u2net_core import SODMetrics
    from u2net_core.runtime import cpu_has_native_bf16

    batch, gts = _images(EVAL_SEED, count, input_size)
    gray = np.zeros(count, bool)
    calibration = None
    if any(m.startswith("int8") for m in modes):
        calib_images, _ = _images(CALIBRATION_SEED, calibration_count, input_size)
        calibration = (calib_images, np.zeros(calibration_count, bool))
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
        m = SODMetrics()
        for p, g in zip(maps[mode], gts):
            m.update(p, g)
        res = m.compute()
        diff = np.abs(maps[mode].astype(np.int16) - maps["fp32"].astype(np.int16))
        out["modes"][mode] = {
            "cpu_ms_per_image": round(cpu * 1000, 1),
            "setup_s": round(setup, 1),
            "mae": res["mae"], "max_f": res["max_f"],
            "mean_abs_diff_u8": float(diff.mean()),
            "max_abs_diff_u8": int(diff.max()),
            "pixels_differing": float((diff > 0).mean()),
        }
    base = out["modes"]["fp32"]
    for r in out["modes"].values():
        r["delta_mae"] = r["mae"] - base["mae"]
        r["delta_max_f"] = r["max_f"] - base["max_f"]
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
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        Path(args.report).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
