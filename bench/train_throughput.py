"""Training throughput: a plain single-process PyTorch loop vs the Ray Train job, same recipe.

    python bench/train_throughput.py --mode plain
    python bench/train_throughput.py --mode ray --workers 2
    python bench/train_throughput.py --mode both --model u2netp --count 96 --epochs 3

Both modes train the same model on the same generated DUTS-style images with the same batch
size, input size, crop, flip and loss. `plain` is what the official script does with no data
workers: one process decodes, augments and trains, one batch after another (reported also as
compute-only, i.e. the model step alone). `ray` runs `jobs.train` (Ray Data decode/augment in
tasks, DDP workers) and reads each epoch's `train_images_per_s_per_worker` from metrics.jsonl;
the first epoch (worker start-up, first execution of the data pipeline) is left out.

Prints one JSON report (also written to --report): machine, settings and images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._machine import machine_info  # noqa: E402  (after the path set-up)


def make_data(root: Path, count: int, source_size: int, seed: int) -> Path:
    from jobs.make_dataset import write_dataset

    # Varied aspect ratios at about DUTS' size, so the resize to the input size is real work.
    write_dataset(root, count=count, seed=seed, size=source_size, aspect_jitter=0.5,
                  workers=os.cpu_count() or 1)
    return root


def run_plain(args, data: Path) -> dict:
    import pyarrow as pa
    import torch

    from pipeline.augment import AugmentConfig, mask_targets, model_inputs, train_transform
    from u2net_core import build_model, deep_supervision_loss

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    pairs = [(p.name, p.read_bytes(), (data / "masks" / f"{p.stem}.png").read_bytes())
             for p in sorted((data / "images").iterdir())]
    # The job's model set-up: channels_last, and bf16 autocast when asked for.
    model = build_model(args.model).train().to(memory_format=torch.channels_last)
    amp = torch.bfloat16 if args.precision == "bf16" else None
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                           weight_decay=0)
    cfg = AugmentConfig(args.input_size, args.crop_size, "horizontal", args.seed)
    data_s = step_s = cpu_s = 0.0
    images = 0
    rng = np.random.default_rng(args.seed)
    epochs = []
    for epoch in range(args.epochs):
        e_data = e_step = 0.0
        e_images = 0
        cpu0 = time.process_time()
        order = rng.permutation(len(pairs))
        for start in range(0, len(order), args.batch_size):
            chosen = [pairs[i] for i in order[start:start + args.batch_size]]
            t0 = time.perf_counter()
            batch = train_transform(pa.table({"key": [c[0] for c in chosen],
                                              "image": [c[1] for c in chosen],
                                              "mask": [c[2] for c in chosen]}), cfg)
            x = model_inputs(torch.from_numpy(batch["image"]), batch["gray"])
            x = x.contiguous(memory_format=torch.channels_last)
            y = mask_targets(torch.from_numpy(batch["mask"]))
            t1 = time.perf_counter()
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(x)
            total, _ = deep_supervision_loss(logits, y)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            t2 = time.perf_counter()
            e_data += t1 - t0
            e_step += t2 - t1
            e_images += len(chosen)
        e_cpu = time.process_time() - cpu0
        epochs.append({"epoch": epoch + 1, "images": e_images,
                       "images_per_s": e_images / (e_data + e_step),
                       "compute_only_images_per_s": e_images / e_step,
                       "images_per_cpu_s": e_images / e_cpu})
        if epoch > 0 or args.epochs == 1:  # the first epoch warms allocator and caches up
            data_s += e_data
            step_s += e_step
            cpu_s += e_cpu
            images += e_images
    return {"mode": "plain", "torch_threads": torch.get_num_threads(),
            "images_per_s": images / (data_s + step_s),
            "compute_only_images_per_s": images / step_s,
            "images_per_cpu_s": images / cpu_s,
            "data_seconds_share": data_s / (data_s + step_s), "epochs": epochs}


def run_ray(args, data: Path, out: Path) -> dict:
    from jobs import train as tr

    parser = argparse.ArgumentParser()
    tr.add_arguments(parser)
    argv = ["--images", str(data / "images"), "--masks", str(data / "masks"),
            "--val-fraction", "0", "--output", str(out), "--name", f"bench-{int(time.time())}",
            "--model", args.model, "--workers", str(args.workers), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--input-size", str(args.input_size),
            "--crop-size", str(args.crop_size), "--seed", str(args.seed),
            "--precision", args.precision]
    if args.num_cpus:
        argv += ["--num-cpus", str(args.num_cpus)]
    t0 = time.perf_counter()
    summary = tr.train(parser.parse_args(argv))
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in
            (Path(summary.run_uri) / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if r["epoch"] > 1] or rows
    per_worker = float(np.mean([r["train_images_per_s_per_worker"] for r in steady]))
    # Training workers' CPU time only: Ray Data's decode tasks run in other processes
    # (plain mode counts its inline decode, ~0.5% of its time at these sizes).
    per_cpu_s = (sum(r["train_samples"] for r in steady)
                 / sum(r["train_cpu_seconds"] for r in steady))
    import ray

    return {"mode": "ray", "workers": args.workers,
            "logical_cpus": ray.cluster_resources().get("CPU"),
            "images_per_s_per_worker": per_worker,
            "images_per_s_total": per_worker * args.workers,
            "images_per_cpu_s": per_cpu_s,
            "job_wall_seconds": wall,
            "epochs": [{k: r[k] for k in ("epoch", "train_samples", "epoch_seconds",
                                          "train_images_per_s_per_worker", "train_cpu_seconds")}
                       for r in rows]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("plain", "ray", "both"), default="both")
    p.add_argument("--model", choices=("u2net", "u2netp"), default="u2netp")
    p.add_argument("--count", type=int, default=48, help="training images (default: 48)")
    p.add_argument("--source-size", type=int, default=400,
                   help="long side of the generated images (default: 400, about DUTS')")
    p.add_argument("--epochs", type=int, default=3, help="epochs; the first is warm-up")
    p.add_argument("--batch-size", type=int, default=12, help="per worker (default: 12)")
    p.add_argument("--input-size", type=int, default=320)
    p.add_argument("--crop-size", type=int, default=288)
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: 2)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="both modes (bf16: CPU autocast, as `jobs.train --precision bf16`)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the plain loop (default: all cores)")
    p.add_argument("--num-cpus", type=float, default=None,
                   help="logical CPUs of the local Ray (default: the cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="reuse this generated dataset folder")
    p.add_argument("--report", default=None, help="also write the JSON report here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else make_data(Path(tmp) / "data", args.count,
                                                            args.source_size, args.seed)
        report = {"machine": machine_info(),
                  "settings": {k: v for k, v in vars(args).items() if k not in ("report",)},
                  "results": []}
        if args.mode in ("plain", "both"):
            report["results"].append(run_plain(args, data))
        if args.mode in ("ray", "both"):
            report["results"].append(run_ray(args, data, Path(tmp) / "runs"))
        report["machine"]["load_average_1m_end"] = os.getloadavg()[0]
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
