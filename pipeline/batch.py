"""One-off batch inference into a Parquet output: plan → skip done → pipeline → sink → reconcile.

    <output>/masks/        one row per image that got a mask
    <output>/mask_errors/  one row per image that did not, with stage, type and message
    <output>/_run.json     the run summary, written last (its presence marks a finished run)

Rerunning into the same output (after success or a kill) processes only keys without a mask
(failed keys are retried) and ends with every key exactly once.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import pyarrow.compute as pc

from pipeline import sinks, storage
from pipeline.config import MaskPipelineConfig
from pipeline.predict import plan_actors
from pipeline.processor import build_mask_pipeline, load_weights_for_run
from pipeline.sources import plan_source, read_source

__all__ = ["run_batch_inference", "OutputConflict", "new_run_id", "stage_stats"]

log = logging.getLogger("u2net_ray")


class OutputConflict(RuntimeError):
    """The output already holds masks from another model or settings."""


def stage_stats(ds) -> dict[str, dict]:
    """Where the pipeline's time went, per Ray Data operator: the summed wall time of its tasks
    (actor calls included), the rows it produced, and the span from its first task's start to
    its last one's end. Stages overlap (streaming), so spans add up to more than the run.

    Read from `Dataset.get_stats_summary` (a Ray DeveloperAPI): if a Ray release changes it,
    the run loses this breakdown, never its result."""
    try:
        summary = ds.get_stats_summary()
        out: dict[str, dict] = {}
        todo = [summary]
        while todo:
            s = todo.pop()
            todo.extend(s.parents)
            for op in s.operators_stats:
                span = None
                if op.earliest_start_time is not None and op.latest_end_time is not None:
                    span = round(op.latest_end_time - op.earliest_start_time, 3)
                out[op.operator_name] = {
                    "task_wall_s": round(op.wall_time.sum, 3) if op.wall_time else None,
                    "rows": int(op.output_num_rows.sum) if op.output_num_rows else None,
                    "span_s": span,
                }
        return dict(reversed(list(out.items())))  # source first, sink last
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        log.debug("no stage statistics: %s", exc)
        return {}


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def run_batch_inference(cfg: MaskPipelineConfig, output_uri: str, *, overwrite: bool = False,
                        rows_per_file: int = 2000, local_cores: int | None = None,
                        run_id: str | None = None) -> dict[str, Any]:
    """Run the job (Ray must be initialised) and return the summary also written to `_run.json`."""
    import ray

    t0 = time.perf_counter()
    run_id = run_id or new_run_id()
    if overwrite and storage.exists(output_uri):
        fs, path = storage.filesystem(output_uri)
        fs.rm(path, recursive=True)

    weights = load_weights_for_run(cfg)
    t_weights = time.perf_counter()

    plan = plan_source(cfg.source)
    if plan.units.num_rows == 0:
        raise storage.StorageError(
            f"no inputs found under {cfg.source.uri!r} (source kind {plan.kind}; "
            f"{plan.listed_files} files listed)")
    t_plan = time.perf_counter()

    state = sinks.read_table_state(output_uri)
    other = state.model_ids - {weights.model_id}
    if other:
        raise OutputConflict(
            f"{output_uri} already holds masks from model_id {sorted(other)[0]} (this run is "
            f"{weights.model_id}); write to a new --output or pass --overwrite")
    done = state.mask_keys
    units = plan.units
    skipped_known = 0
    skip_ref = None
    if plan.keys_known:
        if len(done):
            mask = pc.invert(pc.is_in(units.column("key"), value_set=done.combine_chunks()))
            skipped_known = units.num_rows - int(pc.sum(mask).as_py() or 0)
            units = units.filter(mask)
    elif len(done):  # shard keys are known only inside the shards: the read tasks skip them
        skip_ref = ray.put(frozenset(done.to_pylist()))
    plan.units = units

    actor_plan = plan_actors(cfg.model, ray.cluster_resources(), local_cores=local_cores)
    log.info("run %s: %d units (%s), %d already done; model %s (%s) on %d %s actor(s)",
             run_id, units.num_rows + skipped_known, plan.kind, skipped_known, cfg.model.name,
             weights.model_id, actor_plan.actors, actor_plan.device)

    counts = {"masks": 0, "errors": 0, "skipped": 0, "files": []}
    stages: dict[str, dict] = {}
    if units.num_rows:
        rows = read_source(plan, cfg.source, skip_ref=skip_ref)
        ds = build_mask_pipeline(rows, cfg, weights, actor_plan, rows_expected=plan.known_rows)
        sink = sinks.make_datasink(output_uri, run_id, cfg.model.name, weights.model_id,
                                   rows_per_file=rows_per_file)
        ds.write_datasink(sink)
        counts = sink.counts
        stages = stage_stats(ds)
    t_pipeline = time.perf_counter()

    fix = sinks.reconcile(output_uri, weights.model_id, run_id)
    sinks.ensure_tables(output_uri, run_id)
    final = sinks.read_table_state(output_uri)
    t_end = time.perf_counter()

    n_masks, n_errors = final.masks.num_rows, final.errors.num_rows
    summary = {
        "run_id": run_id,
        "input": cfg.source.uri,
        "source_kind": plan.kind,
        "output": output_uri,
        "model": cfg.model.name,
        "model_id": weights.model_id,
        # every input key is in exactly one of the two tables: inputs == masks + errors
        "inputs": n_masks + n_errors,
        "masks": n_masks,
        "errors": n_errors,
        "processed": counts["masks"] + counts["errors"],
        "processed_masks": counts["masks"],
        "processed_errors": counts["errors"],
        "skipped_done": skipped_known + counts["skipped"],
        "reconcile": fix,
        "files_written": len(counts["files"]),
        "actors": {"device": actor_plan.device, "count": actor_plan.actors,
                   "threads": actor_plan.threads, "batch_size": actor_plan.batch_size},
        "settings": cfg.to_dict(),
        "timings": {
            "weights_s": round(t_weights - t0, 3),
            "plan_s": round(t_plan - t_weights, 3),
            "pipeline_s": round(t_pipeline - t_plan, 3),
            "reconcile_s": round(t_end - t_pipeline, 3),
            "total_s": round(t_end - t0, 3),
            "images_per_s": round((counts["masks"] + counts["errors"]) / max(t_pipeline - t_plan, 1e-9), 2),
        },
        "stages": stages,
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }
    if plan.keys_known:
        summary["listed"] = plan.units.num_rows + skipped_known
    sinks.write_run_summary(output_uri, summary)
    return summary
