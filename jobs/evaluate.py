"""Evaluate a U²-Net on labelled data: MAE, F-, E-, S- and weighted F-measure, on Ray Data.

    python -m jobs.evaluate --images DUTS-TE/im --masks DUTS-TE/gt --model u2net \\
        --weights u2net.pth --output metrics.json

Pipeline: read image + mask bytes (`pipeline.labelled`, the same reader as training) → decode
both to input_size × input_size (CPU tasks, the same decoder as training and inference) → the
model in an actor pool (fused map → sigmoid → optional min–max → uint8) → per-batch
`SODMetrics` (CPU tasks) → the driver sums the per-batch states. Every piece of that state is a
sum over images, so the result is exactly what one `SODMetrics` over all images gives (up to
float summation order): the job prints the full metrics dict as JSON and writes it to
``--output`` when given. Predictions and ground truth are compared at input size, as the
training job's validation does. Samples that cannot be decoded are left out and named in a
warning.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

from jobs._common import UserError, add_ray_arguments, init_ray, job_main
from jobs.train import (add_labelled_arguments, check_input_flags, labelled_source,
                        metrics_from_vector, metrics_to_vector, plan_or_user_error)
from pipeline import storage
from pipeline.allocator import cpu_runtime_env
from pipeline.labelled import read_labelled

log = logging.getLogger("u2net_ray.evaluate")

# CPU stages (decode, metrics) reserve half a CPU: they differ from the model actors'
# reservation, so Ray Data does not fuse them into the actor, and two fit beside it on a
# 2-CPU machine.
STAGE_CPUS = 0.5
READ_CPUS = 0.25


@dataclass(frozen=True)
class ActorPlan:
    actors: int
    num_cpus: float
    num_gpus: float
    threads: int


def plan_actors(cluster: dict, use_gpu: bool, actors: int | None) -> ActorPlan:
    """Model actors: one per GPU with --use-gpu, else one CPU actor with half the logical CPUs
    (the other half decode images and compute metrics; DESIGN §5 on CPU budgets)."""
    cpus = float(cluster.get("CPU", 1))
    if actors is not None and actors < 1:
        raise UserError("--actors must be at least 1")
    if use_gpu:
        gpus = int(cluster.get("GPU", 0))
        n = actors or gpus
        if gpus < max(n, 1):
            raise UserError(f"--use-gpu with {n or 1} actors needs as many GPUs; the cluster "
                            f"has {gpus}")
        plan = ActorPlan(n, 1.0, 1.0, 1)
    else:
        n = actors or 1
        per_actor = max(0.5, math.floor(cpus / 2 / n * 4) / 4)
        plan = ActorPlan(n, per_actor, 0.0, max(1, int(per_actor)))
    # An actor pool that cannot be placed waits forever, and the CPU stages need room too.
    if plan.actors * plan.num_cpus + STAGE_CPUS > cpus:
        raise UserError(f"{plan.actors} model actors × {plan.num_cpus:g} CPUs leave no CPU for "
                        f"decoding on a cluster with {cpus:g}; lower --actors")
    return plan


class SaliencyPredictor:
    """Ray Data actor: decoded images → fused probability maps as uint8, at input size."""

    def __init__(self, model_name: str, weights_ref, normalize: str, use_gpu: bool,
                 threads: int) -> None:
        import ray
        import torch

        from u2net_core import build_model, load_weights

        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        state = ray.get(weights_ref) if isinstance(weights_ref, ray.ObjectRef) else weights_ref
        self.model = load_weights(build_model(model_name), state).eval().to(self.device)
        self.normalize = normalize

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from pipeline.augment import model_inputs
        from u2net_core.transforms import probabilities, to_uint8_map

        ok = batch["ok"]
        preds = np.zeros(batch["mask"].shape, np.uint8)
        if ok.any():
            with torch.inference_mode():
                x = model_inputs(torch.from_numpy(np.ascontiguousarray(batch["image"][ok]))
                                 .to(self.device), batch["gray"][ok])
                fused = self.model(x)[0]  # fp32: a measurement should not depend on autocast
                preds[ok] = to_uint8_map(probabilities(fused, self.normalize))
        return {"key": batch["key"], "error": batch["error"], "ok": ok, "pred": preds,
                "mask": batch["mask"]}


def batch_metrics(batch: dict[str, np.ndarray]) -> pa.Table:
    """Ray Data map function: one batch of (prediction, ground truth) → one row holding the
    batch's additive `SODMetrics` state, plus the samples that could not be decoded."""
    from u2net_core import SODMetrics

    metrics = SODMetrics()
    for ok, pred, gt in zip(batch["ok"], batch["pred"], batch["mask"]):
        if ok:
            metrics.update(pred, gt)
    failed = [f"{k}: {e}" for k, e, ok in zip(batch["key"], batch["error"], batch["ok"]) if not ok]
    return pa.table({"state": pa.array([metrics_to_vector(metrics).tobytes()], pa.binary()),
                     "failed": pa.array([failed], pa.list_(pa.string()))})


def build_pipeline(plan, cfg: argparse.Namespace, weights_ref, actors: ActorPlan):
    import ray

    from pipeline.augment import eval_decode

    ds = read_labelled(plan, read_num_cpus=READ_CPUS)
    ds = ds.map_batches(eval_decode, batch_format="pyarrow", batch_size=cfg.batch_size,
                        fn_kwargs={"input_size": cfg.input_size}, num_cpus=STAGE_CPUS)
    # CPU actors get the allocator settings of the inference actors (`pipeline.allocator`).
    env = {} if actors.num_gpus else {"runtime_env": cpu_runtime_env()}
    ds = ds.map_batches(SaliencyPredictor, batch_size=cfg.batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"model_name": cfg.model, "weights_ref": weights_ref,
                                               "normalize": cfg.normalize,
                                               "use_gpu": cfg.use_gpu, "threads": actors.threads},
                        compute=ray.data.ActorPoolStrategy(size=actors.actors),
                        num_cpus=actors.num_cpus, num_gpus=actors.num_gpus, **env)
    return ds.map_batches(batch_metrics, batch_format="numpy", batch_size=None,
                          num_cpus=STAGE_CPUS)


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    """The whole job; returns `SODMetrics.compute()` over every decodable sample."""
    from u2net_core import WeightsMismatchError, build_model, load_weights
    from u2net_core.checkpoint import filter_state_dict

    t0 = time.perf_counter()
    if args.input_size < 32:
        raise UserError("--input-size must be at least 32")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    check_input_flags(args)
    plan = plan_or_user_error(labelled_source(args, args.images, args.masks, args.input))
    try:
        model = load_weights(build_model(args.model), args.weights)
    except FileNotFoundError:
        raise UserError(f"weights file {args.weights} does not exist") from None
    except WeightsMismatchError as exc:
        raise UserError(str(exc)) from None

    init_ray(args.address, args.num_cpus)
    import ray

    actors = plan_actors(ray.cluster_resources(), args.use_gpu, args.actors)
    # Loaded and checked once here; the actors get it from the object store.
    weights_ref = ray.put(dict(filter_state_dict(model.state_dict())))
    rows = build_pipeline(plan, args, weights_ref, actors).take_all()
    total_vector = np.sum([np.frombuffer(r["state"], np.float64) for r in rows], axis=0)
    metrics = metrics_from_vector(total_vector)
    failed = [f for r in rows for f in r["failed"]]
    for line in failed[:20]:
        log.warning("left out (cannot decode): %s", line)
    if metrics.count == 0:
        raise UserError(f"none of the {len(failed)} samples could be decoded")
    result = metrics.compute()
    log.info("evaluated %d images (%d left out) with %s in %.1fs", metrics.count, len(failed),
             args.weights, time.perf_counter() - t0)
    return result


def run(args: argparse.Namespace) -> int:
    result = evaluate(args)
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.output:
        storage.write_bytes(args.output if "://" in args.output else os.path.abspath(args.output),
                            (text + "\n").encode())
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from u2net_core.registry import MODELS

    add_labelled_arguments(parser, val=False)
    m = parser.add_argument_group("model")
    m.add_argument("--model", choices=sorted(MODELS), default="u2net", help="model variant (default: u2net)")
    m.add_argument("--weights", required=True,
                   help="state dict to evaluate (official .pth, our weights.pth or a "
                        "checkpoint's model.pt; local path or URI)")
    m.add_argument("--input-size", type=int, default=320,
                   help="side the images and masks are resized to (default: 320)")
    m.add_argument("--normalize", choices=("none", "minmax"), default="none",
                   help="min–max normalise each probability map first, as the official "
                        "tool's normPRED (default: none)")
    m.add_argument("--batch-size", type=int, default=16, help="images per model call (default: 16)")
    m.add_argument("--use-gpu", action="store_true", help="run the model on GPUs")
    m.add_argument("--actors", type=int, default=None,
                   help="model actors (default: one per GPU with --use-gpu, else 1)")
    parser.add_argument("--output", default=None,
                        help="also write the metrics JSON here (local path or URI)")
    add_ray_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(add_arguments, run, "python -m jobs.evaluate",
                    (__doc__ or "").splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
