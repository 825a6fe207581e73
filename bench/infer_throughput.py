"""Inference throughput, side by side in one run: official-style loop, decode-only, model-only,
and the end-to-end `jobs.infer` job on the same images with the same weights.

    python bench/infer_throughput.py --model u2netp --count 256 --image-size 1920x1080
    python bench/infer_throughput.py --model u2netp --count 256 --precision fp32 --modes model,e2e
    python bench/infer_throughput.py --device cuda --model u2net --count 20000 --batch-size 64 \\
        --precision bf16 --modes model,e2e

Prints one JSON report (also written to --report) with images/s per mode and the ratios the
project tracks: e2e / official (CPU target ≥ 2×) and e2e / model-from-memory (target ≥ 0.9).
The e2e rate is over the job's pipeline wall time, start-up of the actors included; with
`--marginal K` the job also runs on the first K images, and the difference of the two runs
gives the steady-state rate and the fixed start-up cost separately. Each e2e result also has
the CPU-seconds of every process of the job by role (`bench/_cpu.py`): on a small machine the
gap between e2e and model-from-memory is the CPU the rest of the job takes. int8 is calibrated on
32 generated images of another seed (`--calibration` to use a folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._machine import machine_info  # noqa: E402  (after the path set-up)


def make_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (q90): smooth gradients + shapes + noise, so JPEG sizes are realistic."""
    from PIL import Image, ImageDraw, ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    paths = []
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
        base = np.stack([(xx / w) * rng.uniform(50, 200), (yy / h) * rng.uniform(50, 200),
                         np.full_like(xx, rng.uniform(30, 220))], -1)
        img = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.integers(0, w - 50), rng.integers(0, h - 50)
            x1, y1 = x0 + rng.integers(40, w // 3), y0 + rng.integers(40, h // 3)
            d.ellipse([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        img = img.filter(ImageFilter.GaussianBlur(1.2))
        p = folder / f"img_{i:05d}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


def official_loop(paths, model, size: int, out_dir: Path) -> float:
    """The official u2net_test.py shape: batch 1, full decode, resize, normalise, fp32 eager
    forward, min–max, resize back, PNG save. Pillow replaces skimage for the resize."""
    import torch
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for p in paths:
        img = Image.open(p)
        img = img.convert("RGB")
        w, h = img.size
        x = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
        x = x / np.max(x)
        x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        t = torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32))
        with torch.no_grad():
            d0 = torch.sigmoid(model(t)[0])[0, 0]
        d0 = (d0 - d0.min()) / (d0.max() - d0.min())
        m = Image.fromarray((d0.numpy() * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
        m.save(out_dir / (p.stem + ".png"))
    return len(paths) / (time.perf_counter() - t0)


def decode_only(paths, size: int) -> float:
    from u2net_core import decode_image

    datas = [p.read_bytes() for p in paths]
    t0 = time.perf_counter()
    for d in datas:
        decode_image(d, size)
    return len(datas) / (time.perf_counter() - t0)


def _model_worker(cfg, weights, device, threads, calibration, images, gray, call_rows, ready, go,
                  results):
    """One 'actor' of `model_from_memory`: a process of its own, like a Ray actor, no Ray."""
    import torch

    from pipeline.predict import U2NetPredictor

    pred = U2NetPredictor(cfg, weights, device=device, threads=threads, calibration=calibration)
    pred.predict_uint8(images[: cfg.batch_size], gray[: cfg.batch_size])  # warm-up, compile
    if device == "cuda":
        torch.cuda.synchronize()
    ready.release()
    go.wait()
    t0 = time.perf_counter()
    for start in range(0, len(images), call_rows):  # one call per Ray Data batch, as the actor
        pred.predict_uint8(images[start:start + call_rows], gray[start:start + call_rows])
    if device == "cuda":
        torch.cuda.synchronize()
    results.put((len(images), time.perf_counter() - t0))


def model_from_memory(paths, args, weights, calibration) -> dict:
    """The job's own model path (U2NetPredictor.predict_uint8) fed pre-decoded uint8 inputs,
    laid out as the job lays out its model stage: `plan_actors` for a local Ray on this
    machine gives the number of actors and threads, each actor is a process of its own with
    the actor's environment variables (`model_remote_args`: the allocator settings), and
    each call gets one Ray Data batch (`rows_per_call`). Images/s over the slowest process."""
    import multiprocessing as mp

    from pipeline.config import ModelConfig
    from pipeline.predict import model_remote_args, plan_actors, rows_per_call
    from u2net_core import decode_image

    decoded = [decode_image(p.read_bytes(), args.input_size) for p in paths]
    images = np.stack([d.array for d in decoded])
    gray = np.array([d.gray for d in decoded])
    cfg = ModelConfig(name=args.model, weights=weights, input_size=args.input_size,
                      batch_size=args.batch_size, precision=args.precision, compile=args.compile)
    cores = os.cpu_count()
    resources = {"CPU": cores, "GPU": 1} if args.device == "cuda" else {"CPU": cores}
    plan = plan_actors(cfg, resources, local_cores=None if args.device == "cuda" else cores)
    calib = None
    if calibration:
        from pipeline.processor import read_calibration

        calib = read_calibration(calibration, args.input_size, 178_956_970)
    ctx = mp.get_context("spawn")  # a fresh interpreter per actor, as Ray starts them
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    shares = np.array_split(np.arange(len(images)), plan.actors)
    procs = [ctx.Process(target=_model_worker,
                         args=(cfg, weights, plan.device, plan.threads, calib, images[idx],
                               gray[idx], rows_per_call(plan), ready, go, results))
             for idx in shares]
    actor_env = model_remote_args(plan).get("runtime_env", {}).get("env_vars", {})
    with mock.patch.dict(os.environ, actor_env):  # a spawned child starts with this environment
        for proc in procs:
            proc.start()
    for _ in procs:
        ready.acquire()
    go.set()
    done = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    return {"images_per_s": sum(n for n, _ in done) / max(dt for _, dt in done),
            "actors": plan.actors, "threads": plan.threads, "env": actor_env}


def end_to_end(folder: Path, out: Path, args, weights, calibration) -> dict:
    from jobs import infer

    argv = ["--input", str(folder), "--output", str(out), "--model", args.model, "--weights", weights,
            "--input-size", str(args.input_size), "--batch-size", str(args.batch_size),
            "--precision", args.precision, "--overwrite"]
    if calibration:
        argv += ["--calibration", calibration]
    if args.compile:
        argv += ["--compile"]
    if args.e2e_args:
        argv += args.e2e_args.split()
    from bench._cpu import CpuSampler

    with CpuSampler() as cpu:  # where the machine's CPU went: the model actors, or the rest
        assert infer.main(argv) == 0
    summary = json.loads((out / "_run.json").read_text())
    return {"images": summary["processed"], "images_per_s": summary["timings"]["images_per_s"],
            "pipeline_s": summary["timings"]["pipeline_s"], "total_s": summary["timings"]["total_s"],
            "actors": summary["actors"], "stages": summary.get("stages", {}), "cpu": cpu.report()}


def subset(folder: Path, paths: list[Path], k: int) -> Path:
    """The first k images in a folder of their own (hard links: the same bytes, no copy)."""
    sub = folder.parent / f"{folder.name}_first{k}"
    if not sub.exists() or len(list(sub.glob("*.jpg"))) != k:
        shutil.rmtree(sub, ignore_errors=True)
        sub.mkdir(parents=True)
        for p in paths[:k]:
            os.link(p, sub / p.name)
    return sub


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="u2netp", choices=["u2net", "u2netp"])
    ap.add_argument("--weights", default=None, help="weights file (default: a seeded random init)")
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--image-size", default="1920x1080")
    ap.add_argument("--input-size", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"])
    ap.add_argument("--compile", action="store_true", help="torch.compile in the model path and the job")
    ap.add_argument("--calibration", default=None, help="int8 calibration folder (default: generated)")
    ap.add_argument("--marginal", type=int, default=0, metavar="K",
                    help="also run the job on the first K images: steady-state rate and fixed cost")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--modes", default="official,decode,model,e2e")
    ap.add_argument("--official-count", type=int, default=None, help="images for the official loop (default: all)")
    ap.add_argument("--e2e-args", default="", help="extra flags for jobs.infer, e.g. '--actors 2'")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--report", default=None)
    args = ap.parse_args(argv)

    import torch

    from u2net_core import build_model, load_weights, save_weights

    work = Path(args.workdir or tempfile.mkdtemp(prefix="u2net-bench-"))
    w, h = (int(v) for v in args.image_size.split("x"))
    folder = work / f"images_{args.count}_{w}x{h}"
    paths = sorted(folder.glob("*.jpg")) if folder.exists() else []
    if len(paths) != args.count:
        paths = make_images(folder, args.count, (w, h))
    weights = args.weights
    if weights is None:
        torch.manual_seed(0)
        weights = str(work / f"{args.model}_seed0.pth")
        save_weights(build_model(args.model), weights)
    calibration = args.calibration
    if args.precision == "int8" and not calibration:
        calibration = str(work / "calibration")
        if len(list(Path(calibration).glob("*.jpg"))) != 32:
            make_images(Path(calibration), 32, (w, h), seed=1)
    modes = args.modes.split(",")
    report = {"machine": machine_info(), "args": vars(args), "date": time.strftime("%Y-%m-%d"), "results": {}}
    res = report["results"]
    if "official" in modes:
        model = load_weights(build_model(args.model), weights).eval()
        res["official_ips"] = official_loop(paths[: args.official_count or len(paths)], model,
                                            args.input_size, work / "official_out")
    if "decode" in modes:
        res["decode_ips_per_core"] = decode_only(paths, args.input_size)
    if "model" in modes:
        res["model_from_memory"] = model_from_memory(paths, args, weights, calibration)
        res["model_from_memory_ips"] = res["model_from_memory"]["images_per_s"]
    if "e2e" in modes:
        e2e = end_to_end(folder, work / "e2e_out", args, weights, calibration)
        res["e2e_ips"] = e2e["images_per_s"]
        res["e2e"] = e2e
        # Named "MapBatches(decode_batch)->MapBatches(U2NetPredictor)" where Ray fused decode
        # into the actors (equal CPU reservations, pipeline.predict.plan_actors).
        model_stage = next((v for k, v in e2e["stages"].items()
                            if k.endswith("MapBatches(U2NetPredictor)")), {})
        if model_stage.get("task_wall_s") is not None:
            # Share of the pipeline's wall time that the model actors spent inside calls
            # (target on GPU: > 0.9; the rest is start-up and waiting for input).
            res["model_stage_busy_fraction"] = model_stage["task_wall_s"] / (
                e2e["pipeline_s"] * e2e["actors"]["count"])
        if args.marginal:
            small = end_to_end(subset(folder, paths, args.marginal), work / "e2e_small_out", args,
                               weights, calibration)
            res["e2e_small"] = small
            extra_s = e2e["pipeline_s"] - small["pipeline_s"]
            res["e2e_marginal_ips"] = (e2e["images"] - small["images"]) / max(extra_s, 1e-9)
            # Time the job spends that does not grow with the images: actor start-up, first
            # batches through every stage, the sink's last files.
            res["e2e_fixed_s"] = small["pipeline_s"] - small["images"] / res["e2e_marginal_ips"]
    if "e2e_ips" in res and "official_ips" in res:
        res["ratio_e2e_vs_official"] = res["e2e_ips"] / res["official_ips"]
    if "e2e_ips" in res and "model_from_memory_ips" in res:
        res["ratio_e2e_vs_model"] = res["e2e_ips"] / res["model_from_memory_ips"]
    if "e2e_marginal_ips" in res and "model_from_memory_ips" in res:
        res["ratio_e2e_marginal_vs_model"] = res["e2e_marginal_ips"] / res["model_from_memory_ips"]
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.report:
        Path(args.report).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
