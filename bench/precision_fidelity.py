"""Fidelity of the lower-precision model modes against fp32, on a trained model.

    python bench/precision_fidelity.py --weights tests/fixtures/u2netp_synth_trained.pth \\
        --input-size 128 --count 64

For each mode: mean and max absolute difference of the uint8 maps against fp32, and the change
in MAE and max Fβ (SODMetrics) on make_dataset images the model was not trained on, plus CPU
time per image. `tests/test_precision.py` enforces the bounds recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("fp32", "bf16")


def fidelity(weights: str, model: str = "u2netp", input_size: int = 128, count: int = 32,
             seed: int = 4242, batch_size: int = 8) -> dict:
    import torch

    from jobs.make_dataset import generate_sample
    from pipeline.config import ModelConfig
    from pipeline.predict import U2NetPredictor
    from u2net_core import SODMetrics
    from u2net_core.imageio import decode_image
    from PIL import Image
    import io

    images, gts = [], []
    for i in range(count):
        rgb, mask = generate_sample(seed, i, input_size * 2)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
        images.append(decode_image(buf.getvalue(), input_size).array)
        gts.append(np.asarray(Image.fromarray(mask).resize((input_size, input_size), Image.BILINEAR)))
    batch = np.stack(images)
    gray = np.zeros(count, bool)
    out: dict = {"count": count, "input_size": input_size, "model": model, "modes": {}}
    maps = {}
    for mode in MODES:
        cfg = ModelConfig(name=model, weights=weights, input_size=input_size, batch_size=batch_size,
                          precision=mode)
        pred = U2NetPredictor(cfg, weights, device="cpu", threads=torch.get_num_threads())
        pred.predict_uint8(batch[:batch_size], gray[:batch_size])  # warm-up
        t0 = time.process_time()
        maps[mode] = pred.predict_uint8(batch, gray)
        cpu = (time.process_time() - t0) / count
        m = SODMetrics()
        for p, g in zip(maps[mode], gts):
            m.update(p, g)
        res = m.compute()
        diff = np.abs(maps[mode].astype(np.int16) - maps["fp32"].astype(np.int16)) if mode != "fp32" else None
        out["modes"][mode] = {
            "cpu_ms_per_image": round(cpu * 1000, 1),
            "mae": res["mae"], "max_f": res["max_f"],
            "mean_abs_diff_u8": float(diff.mean()) if diff is not None else 0.0,
            "max_abs_diff_u8": int(diff.max()) if diff is not None else 0,
        }
    base = out["modes"]["fp32"]
    for mode, r in out["modes"].items():
        r["delta_mae"] = r["mae"] - base["mae"]
        r["delta_max_f"] = r["max_f"] - base["max_f"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--model", default="u2netp")
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument("--count", type=int, default=64)
    args = ap.parse_args(argv)
    print(json.dumps(fidelity(args.weights, args.model, args.input_size, args.count), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
