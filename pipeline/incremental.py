"""Incremental planning: which inputs the nightly run must send through the pipeline.

The listing (`pipeline.sources.plan_source`, no image bytes read) is compared with what the
Iceberg tables hold (only the columns `key`, `source_uri`, `source_fingerprint`, `model_id`
are read). Everything is a vectorised Arrow join or group-by, never a Python loop over keys.

Loose files and manifests (keys known from the listing), per key:

| reason    | rule (first that applies)                                        |
|-----------|------------------------------------------------------------------|
| new       | the key is in neither table                                      |
| changed   | a stored row's `source_fingerprint` differs from the listing's   |
| retry     | the key is in `mask_errors` (failed before; also a crash repair) |
| stale     | its mask has another `model_id` (new weights or settings)        |
| full      | `--full`: everything else                                        |
| unchanged | skipped                                                          |

WebDataset shards and Parquet files (keys are known only once a unit is read), per unit; a
stored row belongs to the unit its `source_uri` names (`<unit_uri>#<member>` or the unit
itself for a unit-level error):

| reason    | rule (first that applies)                                           |
|-----------|---------------------------------------------------------------------|
| new       | no stored row belongs to the unit                                   |
| changed   | one of its rows has another fingerprint than the unit's listing     |
| retry     | it has rows in `mask_errors`: read again, but its keys with a       |
|           | current mask (and no error row) are skipped before decode           |
| stale     | one of its masks has another `model_id`                             |
| full      | `--full`                                                            |
| unchanged | skipped (its stored keys count as unchanged)                        |

Prune (`--prune`): files → rows whose key is not listed; units → rows whose unit is not listed
(never rows of a listed unit that this run did not read: their keys are unknown, not gone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.sources import Plan

__all__ = ["StoredRows", "WorkPlan", "Chunk", "plan_work", "iter_chunks", "unit_of", "REASONS",
           "read_stored", "EMPTY_KEYS"]

REASONS = ("new", "changed", "retry", "stale", "full", "unchanged")
EMPTY_KEYS = pa.array([], pa.string())
# Assumed bytes per sample of a shard or Parquet file nobody has read yet, to size chunks.
_BYTES_PER_KEY_GUESS = 100_000

_MASK_COLUMNS = ("key", "source_uri", "source_fingerprint", "model_id")
_ERROR_COLUMNS = ("key", "source_uri", "source_fingerprint")


@dataclass
class StoredRows:
    """The small columns of both tables (no maps)."""

    masks: pa.Table  # key, source_uri, source_fingerprint, model_id
    errors: pa.Table  # key, source_uri, source_fingerprint


def read_stored(tables) -> StoredRows:
    """Read the planning columns of both tables (`pipeline.iceberg.MaskTables`)."""
    from pipeline.iceberg import read_columns

    return StoredRows(_strings(read_columns(tables.masks, _MASK_COLUMNS)),
                      _strings(read_columns(tables.errors, _ERROR_COLUMNS)))


def _strings(t: pa.Table) -> pa.Table:
    # Iceberg reads may return large_string; joins want one string type on both sides.
    return t.cast(pa.schema([pa.field(n, pa.string()) for n in t.column_names]))


@dataclass
class WorkPlan:
    kind: str
    root: str
    listed_files: int
    keys_known: bool
    listed_units: int
    work: pa.Table  # the units to process (UNIT_SCHEMA + reason, est_keys), in key/unit order
    unchanged: int  # keys skipped by planning (unit sources: stored keys of unchanged units)
    reasons: dict[str, int]  # per reason: keys (files) or units (shards, Parquet files)
    skip: pa.Table = None  # unit_uri, key: current masks inside retry units (not decoded again)
    # unit_uri, key, same_bytes: what the tables hold for the units in `work`, and whether the
    # row was made from the unit's current bytes (same fingerprint)
    previous: pa.Table = None
    prune_masks: pa.Array = field(default_factory=lambda: EMPTY_KEYS)
    prune_errors: pa.Array = field(default_factory=lambda: EMPTY_KEYS)


@dataclass
class Chunk:
    index: int
    units: pa.Table
    skip_keys: pa.Array = field(default_factory=lambda: EMPTY_KEYS)
    previous: pa.Table = field(default_factory=lambda: _no_previous())  # see WorkPlan.previous
    est_keys: int = 0


def unit_of(source_uri: pa.Array, unit_uris: pa.Array) -> pa.Array:
    """The unit each row came from: the part of `source_uri` before the first `#`.

    A unit whose own URI has a `#` in it (legal in object keys, rare) is matched by prefix,
    one vectorised pass per such unit."""
    source_uri = source_uri.cast(pa.string())
    units = pc.list_element(pc.split_pattern(source_uri, "#", max_splits=1), 0)
    odd = [u for u in pc.unique(unit_uris).to_pylist() if u and "#" in u]
    for u in sorted(odd, key=len):  # longest last, so it wins over a shorter prefix
        hit = pc.or_(pc.equal(source_uri, u), pc.starts_with(source_uri, u + "#"))
        units = pc.if_else(pc.fill_null(hit, False), u, units)
    return units


def _reason(conditions: list[tuple[str, pa.Array]], n: int) -> pa.Array:
    conds = [pc.fill_null(c, False) for _, c in conditions]
    struct = pc.make_struct(*conds, field_names=[name for name, _ in conditions])
    values = [pa.repeat(name, n) for name, _ in conditions]
    return pc.case_when(struct, *values, pa.repeat("unchanged", n))


def _differs(stored, current) -> pa.Array:
    """Null-safe inequality: a missing stored value never counts as equal."""
    return pc.fill_null(pc.not_equal(stored, current), True)


def _counts(reason: pa.Array, weights: pa.Array | None = None) -> dict[str, int]:
    out = {r: 0 for r in REASONS}
    if weights is None:
        for item in pc.value_counts(reason).to_pylist():
            out[item["values"]] = item["counts"]
    else:
        t = pa.table({"r": reason, "w": weights}).group_by("r").aggregate([("w", "sum")])
        for r, w in zip(t.column("r").to_pylist(), t.column("w_sum").to_pylist()):
            out[r] = int(w or 0)
    return out


def _marked(t: pa.Table, rename: dict[str, str], marker: str) -> pa.Table:
    t = t.select(list(rename)).rename_columns(list(rename.values()))
    return t.append_column(marker, pa.array(np.ones(t.num_rows, bool)))


def plan_work(plan: Plan, stored: StoredRows, model_id: str, *, full: bool = False,
              prune: bool = False) -> WorkPlan:
    """Compare the listing with the tables; see the module docstring for the rules."""
    if plan.keys_known:
        return _plan_keys(plan, stored, model_id, full, prune)
    return _plan_units(plan, stored, model_id, full, prune)


def _plan_keys(plan: Plan, stored: StoredRows, model_id: str, full: bool, prune: bool) -> WorkPlan:
    listing = plan.units
    n = listing.num_rows
    m = _marked(stored.masks, {"key": "key", "source_fingerprint": "m_fp", "model_id": "m_model"}, "in_m")
    e = _marked(stored.errors, {"key": "key", "source_fingerprint": "e_fp"}, "in_e")
    j = (listing.append_column("__row", pa.array(np.arange(n)))
         .join(m, "key", join_type="left outer")
         .join(e, "key", join_type="left outer")
         .sort_by("__row"))  # joins reorder rows: back to listing (key) order
    in_m, in_e = pc.fill_null(j.column("in_m"), False), pc.fill_null(j.column("in_e"), False)
    fp = j.column("fingerprint")
    reason = _reason([
        ("new", pc.and_(pc.invert(in_m), pc.invert(in_e))),
        ("changed", pc.or_(pc.and_(in_m, _differs(j.column("m_fp"), fp)),
                           pc.and_(in_e, _differs(j.column("e_fp"), fp)))),
        ("retry", in_e),
        ("stale", pc.and_(in_m, _differs(j.column("m_model"), model_id))),
        ("full", pa.array(np.full(n, full))),
    ], n)
    todo = pc.not_equal(reason, "unchanged")
    work = (j.select(listing.column_names).append_column("reason", reason)
            .append_column("est_keys", pa.array(np.ones(n, np.int64))).filter(todo))
    prune_masks = prune_errors = EMPTY_KEYS
    if prune:
        listed = listing.column("key")
        prune_masks = _not_in(stored.masks.column("key"), listed)
        prune_errors = _not_in(stored.errors.column("key"), listed)
    counts = _counts(reason)
    return WorkPlan(plan.kind, plan.root, plan.listed_files, True, n, work, counts["unchanged"],
                    counts, skip=pa.table({"unit_uri": EMPTY_KEYS, "key": EMPTY_KEYS}),
                    previous=_no_previous(),
                    prune_masks=prune_masks, prune_errors=prune_errors)


def _no_previous() -> pa.Table:
    return pa.table({"unit_uri": EMPTY_KEYS, "key": EMPTY_KEYS, "same_bytes": pa.array([], pa.bool_())})


def _not_in(values: pa.ChunkedArray | pa.Array, allowed) -> pa.Array:
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    return pc.unique(values.filter(pc.invert(pc.is_in(values, value_set=allowed))))


def _plan_units(plan: Plan, stored: StoredRows, model_id: str, full: bool, prune: bool) -> WorkPlan:
    units = plan.units
    n = units.num_rows
    unit_uris = units.column("unit_uri").combine_chunks()
    nm, ne = stored.masks.num_rows, stored.errors.num_rows
    rows = pa.table({
        "unit_uri": unit_of(pa.concat_arrays([stored.masks.column("source_uri").combine_chunks(),
                                              stored.errors.column("source_uri").combine_chunks()]),
                            unit_uris),
        "key": pa.concat_arrays([stored.masks.column("key").combine_chunks(),
                                 stored.errors.column("key").combine_chunks()]),
        "fp": pa.concat_arrays([stored.masks.column("source_fingerprint").combine_chunks(),
                                stored.errors.column("source_fingerprint").combine_chunks()]),
        "model_bad": pa.concat_arrays([
            _differs(stored.masks.column("model_id"), model_id).combine_chunks(),
            pa.array(np.zeros(ne, bool))]),
        "is_err": pa.array(np.concatenate([np.zeros(nm, bool), np.ones(ne, bool)])),
    })
    listed = _marked(units, {"unit_uri": "unit_uri", "fingerprint": "u_fp"}, "listed")
    rows = rows.join(listed, "unit_uri", join_type="left outer")
    is_listed = pc.fill_null(rows.column("listed"), False)
    rows = rows.append_column("fp_bad", _differs(rows.column("fp"), rows.column("u_fp")))
    current = rows.filter(is_listed)
    per_unit = current.group_by("unit_uri").aggregate(
        [("fp_bad", "any"), ("model_bad", "any"), ("is_err", "any"), ("key", "count")])
    j = (units.append_column("__row", pa.array(np.arange(n)))
         .join(per_unit, "unit_uri", join_type="left outer").sort_by("__row"))
    known = pc.is_valid(j.column("key_count"))
    reason = _reason([
        ("new", pc.invert(known)),
        ("changed", j.column("fp_bad_any")),
        ("retry", j.column("is_err_any")),
        ("stale", j.column("model_bad_any")),
        ("full", pa.array(np.full(n, full))),
    ], n)
    stored_keys = pc.fill_null(j.column("key_count"), 0)
    todo = pc.not_equal(reason, "unchanged")
    est = _estimate_keys(j, stored_keys, known)
    work = (j.select(units.column_names).append_column("reason", reason)
            .append_column("est_keys", est).filter(todo))
    counts = _counts(reason)

    # Keys with a current mask inside retry units: read again but not decoded again.
    retry_units = work.filter(pc.equal(work.column("reason"), "retry")).column("unit_uri")
    error_keys = stored.errors.column("key")
    in_retry_unit = pc.is_in(current.column("unit_uri"), value_set=retry_units)
    a_mask = pc.invert(current.column("is_err"))
    not_failed = pc.invert(pc.is_in(current.column("key"), value_set=error_keys))  # crash repair
    skip = current.filter(pc.and_(pc.and_(in_retry_unit, a_mask), not_failed)).select(["unit_uri", "key"])
    previous = current.filter(pc.is_in(current.column("unit_uri"), value_set=work.column("unit_uri")))
    previous = pa.table({"unit_uri": previous.column("unit_uri"), "key": previous.column("key"),
                         "same_bytes": pc.invert(previous.column("fp_bad"))})
    unchanged = int(pc.sum(stored_keys.filter(pc.equal(reason, "unchanged"))).as_py() or 0)
    prune_masks = prune_errors = EMPTY_KEYS
    if prune:
        gone = pc.invert(is_listed)
        err = rows.column("is_err")
        prune_masks = pc.unique(rows.filter(pc.and_(gone, pc.invert(err))).column("key").combine_chunks())
        prune_errors = pc.unique(rows.filter(pc.and_(gone, err)).column("key").combine_chunks())
    return WorkPlan(plan.kind, plan.root, plan.listed_files, False, n, work, unchanged, counts,
                    skip=skip, previous=previous, prune_masks=prune_masks, prune_errors=prune_errors)


def _estimate_keys(j: pa.Table, stored_keys: pa.Array, known: pa.Array) -> pa.Array:
    """Keys per unit, to size chunks: what the tables hold for it, else its size over the
    bytes per key of the units seen before (or a 100 KB guess)."""
    size = j.column("size").to_numpy(zero_copy_only=False).astype(np.float64)
    keys = np.asarray(stored_keys.to_numpy(zero_copy_only=False), np.float64)
    seen = np.asarray(known.to_numpy(zero_copy_only=False), bool)
    per_key = _BYTES_PER_KEY_GUESS
    if seen.any() and keys[seen].sum() > 0:
        per_key = max(1.0, size[seen].sum() / keys[seen].sum())
    guess = np.maximum(1, np.ceil(size / per_key))
    return pa.array(np.where(seen & (keys > 0), keys, guess).astype(np.int64))


def iter_chunks(plan: WorkPlan, chunk_size: int) -> Iterator[Chunk]:
    """Consecutive runs of the work (key order, so each chunk's keys span a narrow range and
    the upsert rewrites few files), each worth about `chunk_size` keys; a unit is never split."""
    work = plan.work
    if not work.num_rows:
        return
    est = work.column("est_keys").to_numpy(zero_copy_only=False)
    start = np.cumsum(est) - est  # keys before each unit
    chunk_of = start // max(1, chunk_size)
    bounds = np.flatnonzero(np.diff(chunk_of)) + 1
    edges = [0, *bounds.tolist(), work.num_rows]
    for index, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        units = work.slice(a, b - a)
        chunk = Chunk(index, units, est_keys=int(est[a:b].sum()))
        if not plan.keys_known:
            uris = units.column("unit_uri")
            chunk.skip_keys = plan.skip.filter(pc.is_in(plan.skip.column("unit_uri"), value_set=uris)
                                               ).column("key").combine_chunks()
            chunk.previous = plan.previous.filter(
                pc.is_in(plan.previous.column("unit_uri"), value_set=uris))
        yield chunk


# ---------------------------------------------------------------------------------------------
# The nightly run (driver side; Ray must be initialised)

def run_reprocess(cfg, settings, *, chunk_size: int = 10_000, full: bool = False, prune: bool = False,
                  rows_per_file: int = 2000, local_cores: int | None = None,
                  run_id: str | None = None, start_ray: Callable[[], None] | None = None) -> dict:
    """List, plan, prune, then process the work chunk by chunk, one commit set per chunk.

    A crash loses at most the chunk in flight: the next run plans against what is committed.
    Ray is needed only when there is work: `start_ray` is called then (a night with no change
    costs a listing and two small table reads, not a Ray start-up). Without it, Ray must be
    initialised already.
    """
    import logging
    import time

    from pipeline import iceberg, storage
    from pipeline.batch import new_run_id
    from pipeline.processor import read_weights
    from pipeline.sources import plan_source

    log = logging.getLogger("u2net_ray")
    t0 = time.perf_counter()
    run_id = run_id or new_run_id()
    run_model = read_weights(cfg)
    model_id = run_model.model_id
    t_weights = time.perf_counter()

    listing = plan_source(cfg.source)
    if listing.units.num_rows == 0:
        # Also the guard that keeps a wrong or momentarily empty prefix from pruning everything.
        raise storage.StorageError(
            f"no inputs found under {cfg.source.uri!r} (source kind {listing.kind}; "
            f"{listing.listed_files} files listed)")
    tables = iceberg.open_tables(settings)
    stored = read_stored(tables)
    work = plan_work(listing, stored, model_id, full=full, prune=prune)
    chunks = list(iter_chunks(work, chunk_size))
    t_plan = time.perf_counter()
    log.info("run %s: %d %s listed, %s; model_id %s; %d chunk(s) to process", run_id,
             work.listed_units, "keys" if work.keys_known else f"{work.kind} units",
             ", ".join(f"{k} {v}" for k, v in work.reasons.items() if v), model_id, len(chunks))

    snapshots: dict[str, list[int]] = {iceberg.MASKS_TABLE: [], iceberg.ERRORS_TABLE: []}
    pruned = 0
    if prune:
        props = {"u2net.run-id": run_id, "u2net.operation": "prune", "u2net.model-id": model_id}
        snapshots[iceberg.MASKS_TABLE] += iceberg.delete_keys(tables.masks, work.prune_masks, props)
        snapshots[iceberg.ERRORS_TABLE] += iceberg.delete_keys(tables.errors, work.prune_errors, props)
        pruned = len(work.prune_masks) + len(work.prune_errors)
    t_prune = time.perf_counter()

    counts = {"ok": 0, "failed": 0, "skipped": 0, "vanished": 0, "chunks": 0}
    actors = None
    if chunks:
        if start_ray is not None:
            start_ray()
        actors = _process_chunks(cfg, settings, work, chunks, run_model, run_id,
                                 stored, rows_per_file, local_cores, snapshots, counts, log)
    t_end = time.perf_counter()

    processed = counts["ok"] + counts["failed"]
    unchanged = work.unchanged + counts["skipped"]
    summary = {
        "run_id": run_id,
        "input": cfg.source.uri,
        "source_kind": work.kind,
        "warehouse": settings.warehouse,
        "tables": [settings.table_id(iceberg.MASKS_TABLE), settings.table_id(iceberg.ERRORS_TABLE)],
        "model": cfg.model.name,
        "model_id": model_id,
        # keys: listed == unchanged + processed (shard/Parquet keys are counted as read, or as
        # stored for the units that were not read)
        "listed": work.listed_units if work.keys_known else unchanged + processed,
        "unchanged": unchanged,
        "processed": processed,
        "errors": counts["failed"],
        "pruned": pruned,
        "chunks_committed": counts["chunks"],
        "snapshot_ids": snapshots,
        "wall_seconds": round(t_end - t0, 3),
        "reasons": work.reasons,
        "vanished": counts["vanished"],
        "full": full,
        "timings": {"weights_s": round(t_weights - t0, 3), "plan_s": round(t_plan - t_weights, 3),
                    "prune_s": round(t_prune - t_plan, 3), "process_s": round(t_end - t_prune, 3)},
        "settings": cfg.to_dict(),
    }
    if actors is not None:
        summary["actors"] = {"device": actors.device, "count": actors.actors,
                             "threads": actors.threads, "batch_size": actors.batch_size}
    if not work.keys_known:
        summary["listed_units"] = work.listed_units
    return summary


def _process_chunks(cfg, settings, work: WorkPlan, chunks: list[Chunk], run_model,
                    run_id: str, stored: StoredRows, rows_per_file: int,
                    local_cores: int | None, snapshots: dict, counts: dict, log):
    """Run the pipeline once per chunk; `ChunkSink` commits each chunk before the next starts."""
    import ray

    from pipeline import iceberg
    from pipeline.predict import plan_actors
    from pipeline.processor import build_mask_pipeline
    from pipeline.sources import UNIT_SCHEMA, read_source

    weights = run_model.put()
    model_id = run_model.model_id
    actor_plan = plan_actors(cfg.model, ray.cluster_resources(), local_cores=local_cores)
    known_masks = stored.masks.column("key").combine_chunks()
    known_errors = stored.errors.column("key").combine_chunks()
    for chunk in chunks:
        skip_ref = ray.put(frozenset(chunk.skip_keys.to_pylist())) if len(chunk.skip_keys) else None
        units = Plan(work.kind, work.root, chunk.units.select(UNIT_SCHEMA.names), work.listed_files)
        rows = read_source(units, cfg.source, skip_ref=skip_ref)
        ds = build_mask_pipeline(rows, cfg, weights, actor_plan, rows_expected=units.known_rows)
        sink = iceberg.ChunkSink(settings, model=cfg.model.name, model_id=model_id, run_id=run_id,
                                 chunk=chunk.index, known_masks=known_masks,
                                 known_errors=known_errors, previous=chunk.previous,
                                 rows_per_file=rows_per_file)
        ds.write_datasink(sink)
        out = sink.outcome
        counts["chunks"] += 1
        counts["ok"] += out.ok
        counts["failed"] += out.failed
        counts["skipped"] += out.skipped
        counts["vanished"] += out.vanished
        for name, ids in out.snapshots.items():
            snapshots[name] += ids
        # Supersets are enough here: they only decide whether a removal commit is attempted.
        known_masks = pa.concat_arrays([known_masks, out.ok_keys])
        known_errors = pa.concat_arrays([known_errors, out.failed_keys])
        log.info("run %s: chunk %d/%d committed: %d masks, %d errors, %d skipped, %d vanished",
                 run_id, chunk.index + 1, len(chunks), out.ok, out.failed, out.skipped, out.vanished)
    return actor_plan
