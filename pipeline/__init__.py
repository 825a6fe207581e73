"""pipeline: Ray Data and Ray Train building blocks for U²-Net at scale.

Public API (typed config in, lazy `Dataset -> Dataset` out, per-stage resources):

    from pipeline import MaskPipelineConfig, SourceConfig, ModelConfig
    cfg = MaskPipelineConfig(source=SourceConfig("s3://bucket/photos/"),
                             model=ModelConfig(name="u2net", weights="s3://bucket/u2net.pth"))
    summary = run_batch_inference(cfg, "s3://bucket/masks/run1")      # the `infer` job

    plan = plan_source(cfg.source)                                    # or compose it yourself
    rows = read_source(plan, cfg.source)
    masks = build_mask_pipeline(rows, cfg, load_weights_for_run(cfg),
                                plan_actors(cfg.model, ray.cluster_resources()))

Modules are imported lazily, so `import pipeline` is cheap and needs no Ray.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MaskPipelineConfig": "pipeline.config", "SourceConfig": "pipeline.config",
    "ModelConfig": "pipeline.config", "DecodeConfig": "pipeline.config",
    "PostprocessConfig": "pipeline.config",
    "plan_source": "pipeline.sources", "read_source": "pipeline.sources",
    "build_mask_pipeline": "pipeline.processor", "load_weights_for_run": "pipeline.processor",
    "plan_actors": "pipeline.predict",
    "run_batch_inference": "pipeline.batch",
    "read_labelled": "pipeline.labelled",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
