"""`build_mask_pipeline`: rows with image bytes in, rows with masks (or errors) out. Lazy.

    rows ──► decode (CPU tasks) ──► U²-Net (actor pool, GPU or CPU) ──► postprocess (CPU tasks)

Each stage is its own Ray Data operator with its own resource request. The CPU stages ask for
a different CPU amount than the model actors so Ray never fuses them into the actor: decode
work inside a GPU actor would starve the GPU (DESIGN §5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from pipeline.config import MaskPipelineConfig
from pipeline.decode import decode_batch
from pipeline.postprocess import postprocess_batch
from pipeline.predict import (ActorPlan, U2NetPredictor, initial_actors, model_remote_args,
                              rows_per_call)

__all__ = ["build_mask_pipeline", "LoadedWeights", "RunModel", "load_weights_for_run",
           "read_weights", "read_calibration"]


CALIBRATION_MAX_IMAGES = 64
CALIBRATION_MIN_IMAGES = 8


@dataclass
class LoadedWeights:
    ref: Any  # ObjectRef of the state dict, fetched once per actor
    model_id: str
    calibration_ref: Any = None  # int8 only: ObjectRef of (images, gray)


@dataclass
class RunModel:
    """What the driver reads once per run, before any actor starts."""

    state_dict: dict
    model_id: str
    calibration: Optional[tuple] = None  # int8: (N×S×S×3 uint8 images, N gray flags)

    def put(self) -> LoadedWeights:
        """Into Ray's object store: actors never read storage for weights."""
        import ray

        calibration = ray.put(self.calibration) if self.calibration is not None else None
        return LoadedWeights(ray.put(self.state_dict), self.model_id, calibration)


def read_calibration(uri: str, input_size: int, max_pixels: int) -> tuple:
    """The int8 calibration set: up to 64 images under `uri` (first by relative path),
    decoded exactly as the pipeline decodes its inputs."""
    import numpy as np

    from pipeline import storage
    from u2net_core import ImageDecodeError, decode_image

    entries = storage.list_files(uri)[:CALIBRATION_MAX_IMAGES]
    images, gray = [], []
    for entry, data in zip(entries, storage.read_many([e.uri for e in entries])):
        if isinstance(data, Exception):
            raise storage.StorageError(f"cannot read calibration image {entry.uri}: {data}")
        try:
            decoded = decode_image(data, input_size, max_pixels=max_pixels)
        except ImageDecodeError as exc:
            raise storage.StorageError(f"calibration image {entry.uri} does not decode: {exc}")
        images.append(decoded.array)
        gray.append(decoded.gray)
    if len(images) < CALIBRATION_MIN_IMAGES:
        raise storage.StorageError(
            f"--calibration {uri!r} holds {len(images)} images; int8 needs at least "
            f"{CALIBRATION_MIN_IMAGES} representative ones (up to {CALIBRATION_MAX_IMAGES} are used)")
    return np.stack(images), np.array(gray, bool)


def read_weights(cfg: MaskPipelineConfig) -> RunModel:
    """Read and validate the weights (and the int8 calibration set) once, on the driver, and
    hash them into the `model_id`.

    A wrong file fails here, in one line, before any actor starts. Needs no Ray, so planning
    (which may find nothing to do) does not start it."""
    from pipeline.predict import compute_model_id
    from u2net_core import build_model, load_weights
    from u2net_core.runtime import calibration_digest

    state_dict = load_weights(build_model(cfg.model.name), cfg.model.weights).state_dict()
    settings = cfg.output_settings()
    calibration = None
    if cfg.model.precision == "int8":
        if not cfg.model.calibration:
            raise ValueError("precision int8 needs a calibration URI: a folder of "
                             f"{CALIBRATION_MIN_IMAGES}-{CALIBRATION_MAX_IMAGES} images like the "
                             "ones to be processed")
        calibration = read_calibration(cfg.model.calibration, cfg.model.input_size,
                                       cfg.decode.max_pixels)
        # The quantisation scales come from these images: another set, other masks.
        settings["calibration"] = calibration_digest(*calibration)
    return RunModel(state_dict, compute_model_id(state_dict, settings), calibration)


def load_weights_for_run(cfg: MaskPipelineConfig) -> LoadedWeights:
    """`read_weights`, then into Ray's object store."""
    return read_weights(cfg).put()


def build_mask_pipeline(rows, cfg: MaskPipelineConfig, weights: LoadedWeights, plan: ActorPlan,
                        rows_expected: int | None = None):
    """READ_SCHEMA rows → rows with prob_map, coverage, bbox (+ png/rle/cutouts as asked).

    `rows_expected`: the rows to come, where the plan knows it (`Plan.known_rows`): the model
    pool then starts with only as many actors as that many rows can keep busy. Unknown (shards,
    Parquet files: hundreds of rows each, typically) starts them all."""
    import ray

    keep_bytes = bool(cfg.post.cutouts)
    model_opts = model_remote_args(plan)
    decode_opts: dict[str, Any] = {"num_cpus": cfg.decode.num_cpus}
    if plan.device == "cpu" and plan.num_cpus == cfg.decode.num_cpus:
        # Ray Data fuses two stages only when their Ray options are equal. Where CPU actors
        # reserve what decode does (the small local layout), decode gets their runtime_env
        # too and runs inside them: no decoded image crosses the object store, one worker
        # process fewer per actor. Same speed fused or not; unfused, the 100k-image memory
        # run's whole-tree PSS rose 1.15× over 10k (BENCHMARKS.md).
        decode_opts["runtime_env"] = model_opts["runtime_env"]
    ds = rows.map_batches(decode_batch, batch_format="pyarrow", batch_size=cfg.decode.batch_size,
                          fn_kwargs={"cfg": cfg.decode, "keep_bytes": keep_bytes},
                          **decode_opts)
    # The plan resolves what the config leaves open (the batch size); actors get the result.
    model_cfg = dataclasses.replace(cfg.model, batch_size=plan.batch_size)
    call_rows = rows_per_call(plan)
    initial = initial_actors(plan, rows_expected)
    ds = ds.map_batches(
        U2NetPredictor,
        batch_format="pyarrow",
        batch_size=call_rows,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.actors, initial_size=initial),
        fn_constructor_kwargs={"cfg": model_cfg, "weights": weights.ref, "device": plan.device,
                               "threads": plan.threads, "calibration": weights.calibration_ref},
        **model_opts,
    )
    return ds.map_batches(postprocess_batch, batch_format="pyarrow", batch_size=cfg.post.batch_size,
                          fn_kwargs={"cfg": cfg.post}, num_cpus=cfg.post.num_cpus)
