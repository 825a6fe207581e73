"""`build_mask_pipeline`: rows with image bytes in, rows with masks (or errors) out. Lazy.

    rows ──► decode (CPU tasks) ──► U²-Net (actor pool, GPU or CPU) ──► postprocess (CPU tasks)

Each stage is its own Ray Data operator with its own resource request. The CPU stages ask for
a different CPU amount than the model actors so Ray never fuses them into the actor: decode
work inside a GPU actor would starve the GPU (DESIGN §5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import MaskPipelineConfig
from pipeline.decode import decode_batch
from pipeline.postprocess import postprocess_batch
from pipeline.predict import ActorPlan, U2NetPredictor

__all__ = ["build_mask_pipeline", "LoadedWeights", "load_weights_for_run", "read_weights"]


@dataclass
class LoadedWeights:
    ref: Any  # ObjectRef of the state dict, fetched once per actor
    model_id: str


def read_weights(cfg: MaskPipelineConfig) -> tuple[dict, str]:
    """Read and validate the weights once, on the driver, and hash them into the `model_id`.

    A wrong file fails here, in one line, before any actor starts. Needs no Ray, so planning
    (which may find nothing to do) does not start it."""
    from pipeline.predict import compute_model_id
    from u2net_core import build_model, load_weights

    state_dict = load_weights(build_model(cfg.model.name), cfg.model.weights).state_dict()
    return state_dict, compute_model_id(state_dict, cfg.output_settings())


def load_weights_for_run(cfg: MaskPipelineConfig) -> LoadedWeights:
    """`read_weights`, then into Ray's object store: actors never read storage for weights."""
    import ray

    state_dict, model_id = read_weights(cfg)
    return LoadedWeights(ray.put(state_dict), model_id)


def build_mask_pipeline(rows, cfg: MaskPipelineConfig, weights: LoadedWeights, plan: ActorPlan):
    """READ_SCHEMA rows → rows with prob_map, coverage, bbox (+ png/rle/cutouts as asked)."""
    import ray

    keep_bytes = bool(cfg.post.cutouts)
    ds = rows.map_batches(decode_batch, batch_format="pyarrow", batch_size=cfg.decode.batch_size,
                          fn_kwargs={"cfg": cfg.decode, "keep_bytes": keep_bytes},
                          num_cpus=cfg.decode.num_cpus)
    remote: dict[str, Any] = {"num_cpus": plan.num_cpus}
    if plan.num_gpus:
        remote["num_gpus"] = plan.num_gpus
    ds = ds.map_batches(
        U2NetPredictor,
        batch_format="pyarrow",
        # Several model batches per call amortise the Python overhead per call.
        batch_size=plan.batch_size * (4 if plan.device == "cpu" else 8),
        # Start with one actor and let Ray Data add more while work is queued: small inputs do
        # not pay for loading weights into actors that would never get a batch.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.actors),
        fn_constructor_kwargs={"cfg": cfg.model, "weights": weights.ref, "device": plan.device,
                               "threads": plan.threads},
        **remote,
    )
    return ds.map_batches(postprocess_batch, batch_format="pyarrow", batch_size=cfg.post.batch_size,
                          fn_kwargs={"cfg": cfg.post}, num_cpus=cfg.post.num_cpus)
