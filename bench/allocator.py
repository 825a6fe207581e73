"""The model path with and without the allocator settings of the model actors, side by side.

    python bench/allocator.py --model u2net --images 24
    python bench/allocator.py --model u2netp --images 64 --variants thread,thread+settings

Each variant starts `--processes` fresh interpreters at once (2: the job's layout on 2 cores),
each running `U2NetPredictor.predict_uint8` with 1 thread on random 320×320 inputs, one
warm-up call, then `--images` images in calls of one batch. A variant is where the calls run
(`main`: the process's main thread, as in a plain script; `thread`: a worker thread, as Ray
Data's actor wrapper and Ray Train's training thread run them) and with which environment
(`+settings`: `pipeline.allocator.CPU_MALLOC_ENV`; `+nommap`: only `MALLOC_MMAP_MAX_=0` and
the trim threshold, to show why one arena is needed). Reports per process: images/s, minor
page faults per image, the share of CPU time spent in the kernel, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._machine import machine_info  # noqa: E402  (after the path set-up)

VARIANTS = ("main", "main+settings", "thread", "thread+nommap", "thread+settings")


def variant_env(variant: str) -> dict[str, str]:
    from pipeline.allocator import CPU_MALLOC_ENV

    if variant.endswith("+settings"):
        return dict(CPU_MALLOC_ENV)
    if variant.endswith("+nommap"):
        return {k: v for k, v in CPU_MALLOC_ENV.items() if k != "MALLOC_ARENA_MAX"}
    return {}


def worker(model: str, images: int, batch: int, precision: str, in_thread: bool) -> dict:
    import numpy as np
    import torch

    from pipeline.config import ModelConfig
    from pipeline.predict import U2NetPredictor
    from u2net_core import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(name=model, input_size=320, batch_size=batch, precision=precision)
    pred = U2NetPredictor(cfg, build_model(model).state_dict(), threads=1)
    x = np.random.default_rng(0).integers(0, 255, (batch, 320, 320, 3), dtype=np.uint8)
    gray = np.zeros(batch, bool)

    def run() -> dict:
        pred.predict_uint8(x, gray)  # warm-up
        r0, t0 = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter()
        for _ in range(max(1, images // batch)):
            pred.predict_uint8(x, gray)
        r1, dt = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter() - t0
        n = max(1, images // batch) * batch
        user, sys_ = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
        return {"images_per_s": n / dt, "minor_faults_per_image": (r1.ru_minflt - r0.ru_minflt) / n,
                "kernel_share": sys_ / max(user + sys_, 1e-9)}

    if in_thread:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            out = pool.submit(run).result()
    else:
        out = run()
    out["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_variant(variant: str, args) -> dict:
    env = {**os.environ, **variant_env(variant)}
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--images", str(args.images),
           "--batch-size", str(args.batch_size), "--precision", args.precision]
    if variant.startswith("thread"):
        cmd.append("--in-thread")
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(args.processes)]
    per = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return {"variant": variant, "env": variant_env(variant), "processes": per,
            "images_per_s_total": sum(p["images_per_s"] for p in per)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="u2net", choices=["u2net", "u2netp"])
    ap.add_argument("--images", type=int, default=24, help="per process, after the warm-up")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--report", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--in-thread", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.model, args.images, args.batch_size, args.precision,
                                args.in_thread)))
        return 0
    report = {"machine": machine_info(), "args": vars(args), "date": time.strftime("%Y-%m-%d"),
              "results": [run_variant(v, args) for v in args.variants.split(",")]}
    print(json.dumps(report, indent=2))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
