"""The U²-Net stage: an actor pool that turns uint8 inputs into fused probability maps.

Weights are loaded once per actor (from the object store, put there once by the driver), the
model runs under `torch.inference_mode`, and only the model runs here: decode and postprocess
are CPU stages of their own. GPU actors are used when the cluster has GPUs (bf16/fp16
autocast, channels_last, cudnn autotuning, pinned host buffers and non-blocking copies, and
batches padded to a fixed shape so autotuned kernels are reused); CPU actors otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from pipeline.config import ModelConfig
from pipeline.schema import RowStatus

__all__ = ["U2NetPredictor", "ActorPlan", "plan_actors", "compute_model_id", "PREDICTED_FIELDS"]

PREDICTED_FIELDS = [
    ("prob_map", pa.binary()),
    ("map_height", pa.int16()),
    ("map_width", pa.int16()),
]


def compute_model_id(state_dict: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """Hash of the weights (keys, shapes, dtypes, bytes in order) and of every setting that
    changes the output. Same weights and settings → same id on any machine."""
    import torch

    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
    h.update(json.dumps(dict(settings), sort_keys=True).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ActorPlan:
    """How the model stage is placed; chosen from the cluster's resources."""

    device: str  # "cuda" or "cpu"
    actors: int
    num_gpus: float
    num_cpus: float
    threads: int
    batch_size: int


def plan_actors(cfg: ModelConfig, cluster: Mapping[str, float], local_cores: int | None = None
                ) -> ActorPlan:
    """Pure function of the config and `ray.cluster_resources()`, so it is tested on CPU.

    GPUs present: one actor per GPU (or `gpus_per_actor` shares), 1 CPU each for the Python
    side. CPU only: actors of `cpus_per_actor` CPUs (1 on small clusters, 4 on larger ones),
    using 3/4 of the CPUs and leaving the rest to read/decode/postprocess tasks; torch threads
    follow the reservation. `local_cores` is set for the embedded local Ray, where the model
    is the bottleneck and may use every physical core.
    """
    gpus = float(cluster.get("GPU", 0) or 0)
    cpus = float(cluster.get("CPU", 1) or 1)
    use_gpu = (cfg.gpus_per_actor is None and gpus > 0) or bool(cfg.gpus_per_actor)
    if use_gpu:
        per = cfg.gpus_per_actor or 1.0
        if gpus <= 0:
            raise ValueError("--gpus-per-actor was given but the cluster has no GPUs")
        actors = cfg.actors or max(1, int(gpus // per))
        num_cpus = cfg.cpus_per_actor if cfg.cpus_per_actor is not None else 1.0
        return ActorPlan("cuda", actors, per, num_cpus, max(1, int(num_cpus)), cfg.batch_size)
    per_cpu = cfg.cpus_per_actor if cfg.cpus_per_actor is not None else (4.0 if cpus >= 8 else 1.0)
    actors = cfg.actors or max(1, int((cpus * 0.75) // per_cpu))
    threads = max(1, int(per_cpu))
    if local_cores:
        threads = max(1, local_cores // actors)
    return ActorPlan("cpu", actors, 0.0, per_cpu, threads, cfg.batch_size)


class U2NetPredictor:
    """Ray Data callable class (one instance per actor)."""

    def __init__(self, cfg: ModelConfig, weights: Any, device: str = "cpu", threads: int = 1) -> None:
        import torch

        from u2net_core import build_model, load_weights

        if device == "cpu":
            torch.set_num_threads(threads)
        try:
            import ray

            if isinstance(weights, ray.ObjectRef):
                weights = ray.get(weights)
        except ImportError:  # used without Ray (tests, notebooks): weights is a dict or a path
            pass
        self.cfg = cfg
        self.device = torch.device(device)
        model = load_weights(build_model(cfg.name), weights).eval()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: autotune once
        model = model.to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.pad_batches = self.device.type == "cuda"

    def predict_uint8(self, images: np.ndarray, gray: np.ndarray) -> np.ndarray:
        """N×S×S×3 uint8 → N×S×S uint8 fused probability maps."""
        import torch

        from u2net_core.transforms import normalize, probabilities, to_uint8_map

        n = images.shape[0]
        out = np.empty(images.shape[:3], np.uint8)
        bs = self.cfg.batch_size
        for start in range(0, n, bs):
            chunk = torch.from_numpy(images[start:start + bs])
            g = gray[start:start + bs]
            real = chunk.shape[0]
            if self.pad_batches and real < bs:
                pad = bs - real
                chunk = torch.cat([chunk, chunk[-1:].expand(pad, *chunk.shape[1:])])
                g = np.concatenate([g, np.repeat(g[-1:], pad)])
            if self.device.type == "cuda":
                chunk = chunk.pin_memory().to(self.device, non_blocking=True)
            x = normalize(chunk, gray=g)
            if self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast(
                    self.device.type, dtype=self.autocast_dtype or torch.float32,
                    enabled=self.autocast_dtype is not None):
                d0 = self.model(x)[0]
            prob = probabilities(d0, self.cfg.normalize)
            out[start:start + real] = to_uint8_map(prob[:real])
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = RowStatus(batch)
        s = self.cfg.input_size
        n = batch.num_rows
        idx = [i for i in range(n) if rows.ok(i)]
        maps: list[bytes | None] = [None] * n
        if idx:
            raw = batch.column("image").to_pylist()
            gray_col = batch.column("gray").to_pylist()
            images = np.empty((len(idx), s, s, 3), np.uint8)  # writable: torch shares it
            for j, i in enumerate(idx):
                images[j] = np.frombuffer(raw[i], np.uint8).reshape(s, s, 3)
            gray = np.array([bool(gray_col[i]) for i in idx])
            try:
                pred = self.predict_uint8(images, gray)
                for j, i in enumerate(idx):
                    maps[i] = pred[j].tobytes()
            except Exception as exc:
                # A batch-level failure (e.g. out of memory) is recorded on each of its rows;
                # they are retried by the next run like any failed key.
                for i in idx:
                    rows.fail(i, "model", exc)
        size = [s if m is not None else None for m in maps]
        table = rows.write(batch.drop_columns(["image"]))
        table = table.append_column("prob_map", pa.array(maps, pa.binary()))
        table = table.append_column("map_height", pa.array(size, pa.int16()))
        table = table.append_column("map_width", pa.array(size, pa.int16()))
        return table
