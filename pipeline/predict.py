"""The U²-Net stage: an actor pool that turns uint8 inputs into fused probability maps.

Weights are loaded once per actor (from the object store, put there once by the driver), and
only the model runs here: decode and postprocess are CPU stages of their own. How the forward
pass runs (precision, channels_last, torch.compile, int8) is `u2net_core.runtime.InferenceModel`.
GPU actors are used when the cluster has GPUs (pinned host buffers and non-blocking copies,
batches padded to a fixed shape so cuDNN's autotuned kernels are reused); CPU actors otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from pipeline.allocator import cpu_runtime_env
from pipeline.config import ModelConfig
from pipeline.schema import RowStatus

__all__ = ["U2NetPredictor", "ActorPlan", "plan_actors", "rows_per_call", "model_remote_args",
           "compute_model_id", "PREDICTED_FIELDS"]

log = logging.getLogger("u2net_ray")

PREDICTED_FIELDS = [
    ("prob_map", pa.binary()),
    ("map_height", pa.int16()),
    ("map_width", pa.int16()),
]


def _fetch(value: Any) -> Any:
    """An object-store reference resolved in the actor; anything else (a state dict, a path,
    None: used without Ray in tests and notebooks) as it is."""
    try:
        import ray

        if isinstance(value, ray.ObjectRef):
            return ray.get(value)
    except ImportError:
        pass
    return value


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


# Images per forward pass when `--batch-size` is not given, at 320×320 (scaled by pixel count
# for other sizes). CPU: oneDNN gains nothing from larger batches once one image fills the
# cores, and small batches keep the working set in cache (BENCHMARKS.md). GPU: large enough to
# fill an H100-class card in bf16, small enough for 16 GB cards (U²-Net at 320, bf16, batch 64
# peaks well under that; set --batch-size for smaller cards).
DEFAULT_BATCH_320 = {"cpu": 8, "cuda": 64}

# On an embedded local Ray with fewer cores than this, one 1-thread actor per core (measured
# on 2 cores); with more, actors of several threads (intra-op threads cost less memory than
# model copies; not yet measured against one actor per core there).
LOCAL_ONE_THREAD_ACTORS_BELOW = 8


def default_batch_size(device: str, input_size: int) -> int:
    scaled = DEFAULT_BATCH_320[device] * (320 / input_size) ** 2
    return int(min(max(1, round(scaled)), 8 * DEFAULT_BATCH_320[device]))


def plan_actors(cfg: ModelConfig, cluster: Mapping[str, float], local_cores: int | None = None
                ) -> ActorPlan:
    """Pure function of the config and `ray.cluster_resources()`, so it is tested on CPU.

    GPUs present: one actor per GPU (or `gpus_per_actor` shares), 1 CPU each for the Python
    side. CPU only: actors of `cpus_per_actor` CPUs (1 on small clusters, 4 on larger ones),
    using 3/4 of the CPUs and leaving the rest to read/decode/postprocess tasks; torch threads
    follow the reservation. `local_cores` is set for the embedded local Ray, where the model
    is the bottleneck and may use every physical core: below 8 cores one 1-thread actor per
    core, else threads = cores // actors. The batch size, when not given, is chosen for the
    device (`default_batch_size`).
    """
    gpus = float(cluster.get("GPU", 0) or 0)
    cpus = float(cluster.get("CPU", 1) or 1)
    use_gpu = (cfg.gpus_per_actor is None and gpus > 0) or bool(cfg.gpus_per_actor)
    if use_gpu:
        per = cfg.gpus_per_actor or 1.0
        if gpus <= 0:
            raise ValueError("--gpus-per-actor was given but the cluster has no GPUs")
        if cfg.precision == "int8":
            raise ValueError("--precision int8 runs on CPU actors only; on GPUs use bf16 or fp16")
        actors = cfg.actors or max(1, int(gpus // per))
        num_cpus = cfg.cpus_per_actor if cfg.cpus_per_actor is not None else 1.0
        batch = cfg.batch_size or default_batch_size("cuda", cfg.input_size)
        return ActorPlan("cuda", actors, per, num_cpus, max(1, int(num_cpus)), batch)
    batch = cfg.batch_size or default_batch_size("cpu", cfg.input_size)
    if (local_cores and local_cores < LOCAL_ONE_THREAD_ACTORS_BELOW and cfg.actors is None
            and cfg.cpus_per_actor is None):
        # A small machine: one single-threaded actor per core. Measured on 2 cores
        # (BENCHMARKS.md): two 1-thread processes compute 1.24x the images of one 2-thread
        # process, which computes 1.6x one thread. Together they reserve half of
        # the local Ray's logical CPUs, so read, decode, postprocess and write tasks always
        # find a slot beside them: those use little CPU, but with one slot left they queue
        # behind each other and the actors wait for input. (The reservations equal the decode
        # stage's, and `build_mask_pipeline` then fuses decode into the actors; on CPU that
        # costs nothing, measured.)
        return ActorPlan("cpu", local_cores, 0.0, cpus / (2 * local_cores), 1, batch)
    per_cpu = cfg.cpus_per_actor if cfg.cpus_per_actor is not None else (4.0 if cpus >= 8 else 1.0)
    actors = cfg.actors or max(1, int((cpus * 0.75) // per_cpu))
    threads = max(1, int(per_cpu))
    if local_cores:
        threads = max(1, local_cores // actors)
    return ActorPlan("cpu", actors, 0.0, per_cpu, threads, batch)


def model_remote_args(plan: ActorPlan) -> dict[str, Any]:
    """Ray options of a model actor: its resources, and on CPU the allocator settings
    (`pipeline.allocator`: without them each image costs 41,000–75,000 page faults)."""
    remote: dict[str, Any] = {"num_cpus": plan.num_cpus}
    if plan.num_gpus:
        remote["num_gpus"] = plan.num_gpus
    if plan.device == "cpu":
        remote["runtime_env"] = cpu_runtime_env()
    return remote


def rows_per_call(plan: ActorPlan) -> int:
    """Rows per model-actor call (one Ray Data batch): several model batches per call
    amortise the Python overhead of a call."""
    return plan.batch_size * (4 if plan.device == "cpu" else 8)


def initial_actors(plan: ActorPlan, rows_expected: int | None) -> int:
    """How many model actors to start with: as many as the known work can keep busy (one
    call's rows each), all of them when the amount is unknown. Ray Data adds more while work
    is queued, but starting with one and leaving the rest to the autoscaler left the second
    of two actors without work for a whole 256-image run on 2 cores (BENCHMARKS.md); and
    small inputs should not pay for loading weights into actors that would never get a batch."""
    if rows_expected is None:
        return plan.actors
    return min(plan.actors, max(1, math.ceil(rows_expected / rows_per_call(plan))))


class _DeviceFeed:
    """Host → device copies on a side stream (CUDA), so the next batch travels while the
    current one computes; on CPU a pass-through, so the predictor's loop is one loop."""

    def __init__(self, device) -> None:
        import torch

        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def put(self, host_tensor):
        if self.stream is None:
            return host_tensor, None
        import torch

        with torch.cuda.stream(self.stream):
            tensor = host_tensor.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return tensor, done

    def get(self, item):
        tensor, done = item
        if done is not None:
            import torch

            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            tensor.record_stream(compute)  # the allocator must not reuse it before compute ends
        return tensor


class U2NetPredictor:
    """Ray Data callable class (one instance per actor)."""

    def __init__(self, cfg: ModelConfig, weights: Any, device: str = "cpu", threads: int = 1,
                 calibration: Any = None) -> None:
        import torch

        from u2net_core import build_model, load_weights
        from u2net_core.runtime import InferenceModel

        if device == "cpu":
            torch.set_num_threads(threads)
        weights, calibration = _fetch(weights), _fetch(calibration)
        self.cfg = cfg
        self.device = torch.device(device)
        # `build_mask_pipeline` passes the plan's batch size; direct users may leave it open.
        self.batch_size = cfg.batch_size or default_batch_size(self.device.type, cfg.input_size)
        model = load_weights(build_model(cfg.name), weights)
        # Compiled models are specialised to one shape and GPUs autotune per shape: both get
        # every batch padded to `batch_size` (the padding rows are dropped after the forward).
        self.pad_batches = self.device.type == "cuda" or cfg.compile or cfg.precision == "int8"
        self.model = InferenceModel(model, self.device, cfg.precision,
                                    channels_last=cfg.channels_last, compile=cfg.compile,
                                    fixed_batch=self.batch_size if self.pad_batches else None,
                                    calibration=calibration)
        log.info("model actor: %s", json.dumps({"model": cfg.name, "threads": threads,
                                                 **self.model.describe()}))

    def predict_uint8(self, images: np.ndarray, gray: np.ndarray) -> np.ndarray:
        """N×S×S×3 uint8 → N×S×S uint8 fused probability maps.

        The same loop on every device. On CUDA the inputs are page-locked once, batch k+1 is
        copied on a side stream while batch k computes, the maps stay on the GPU as uint8
        and come back in one copy: one host sync per call, not one per batch.
        """
        import torch

        from u2net_core.transforms import normalize, probabilities, quantize_map

        n, bs = images.shape[0], self.batch_size
        host = torch.from_numpy(images)
        if self.device.type == "cuda":
            host = host.pin_memory()
        spans = [(start, min(n, start + bs)) for start in range(0, n, bs)]
        feed = _DeviceFeed(self.device)
        pending = feed.put(host[spans[0][0]:spans[0][1]]) if spans else None
        maps = []
        for k, (start, stop) in enumerate(spans):
            chunk = feed.get(pending)
            if k + 1 < len(spans):  # queued now: overlaps with this batch's forward
                pending = feed.put(host[spans[k + 1][0]:spans[k + 1][1]])
            g = gray[start:stop]
            if self.pad_batches and stop - start < bs:
                pad = bs - (stop - start)
                chunk = torch.cat([chunk, chunk[-1:].expand(pad, *chunk.shape[1:])])
                g = np.concatenate([g, np.repeat(g[-1:], pad)])
            d0 = self.model(normalize(chunk, gray=g))
            maps.append(quantize_map(probabilities(d0, self.cfg.normalize))[:stop - start])
        if not maps:
            return np.empty(images.shape[:3], np.uint8)
        return torch.cat(maps).cpu().numpy()

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
