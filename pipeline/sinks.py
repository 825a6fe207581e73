"""Sinks: the `masks` and `mask_errors` tables as plain Parquet datasets (DESIGN §3).

One pass over the pipeline writes both tables: each write task splits its rows by status and
writes one file to each table. Files are named after the run and a hash of the keys they
hold, and appear atomically (rename locally, single PUT on object stores), so a retried task
overwrites its own file instead of adding a second one, and a killed run leaves only whole
files. `reconcile` then makes the tables exact: one row per key, and no key in both tables.
A rerun into the same output skips keys already in `masks` and retries keys in `mask_errors`.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.schema import ERRORS_SCHEMA, MASKS_SCHEMA, STATUS_ERROR, STATUS_OK, STATUS_SKIP

__all__ = ["make_datasink", "TableState", "read_table_state", "reconcile", "write_run_summary",
           "ensure_tables", "MASKS_DIR", "ERRORS_DIR", "RUN_SUMMARY"]

MASKS_DIR, ERRORS_DIR, RUN_SUMMARY = "masks", "mask_errors", "_run.json"
PARQUET_OPTIONS = {"compression": "zstd", "compression_level": 3}


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **PARQUET_OPTIONS)
    return buf.getvalue()


def _file_name(run_id: str, keys: Iterable[str]) -> str:
    h = hashlib.sha1()
    for k in sorted(keys):
        h.update(k.encode())
        h.update(b"\0")
    return f"part-{run_id}-{h.hexdigest()[:16]}.parquet"


def masks_rows(table: pa.Table, model: str, model_id: str, run_id: str, now: datetime) -> pa.Table:
    """Rows with status ok → the exact `masks` schema."""
    n = table.num_rows
    cols = {}
    for f in MASKS_SCHEMA:
        if f.name in ("model", "model_id", "run_id"):
            cols[f.name] = pa.array([{"model": model, "model_id": model_id, "run_id": run_id}[f.name]] * n, f.type)
        elif f.name == "processed_at":
            cols[f.name] = pa.array([now] * n, f.type)
        else:
            cols[f.name] = table.column(f.name).cast(f.type)
    return pa.table(cols, schema=MASKS_SCHEMA)


def error_rows(table: pa.Table, model_id: str, run_id: str, now: datetime) -> pa.Table:
    n = table.num_rows
    return pa.table({
        "key": table.column("key"),
        "source_uri": table.column("source_uri"),
        "source_fingerprint": table.column("source_fingerprint"),
        "stage": table.column("error_stage"),
        "error_type": table.column("error_type"),
        "error_message": table.column("error_message"),
        "model_id": pa.array([model_id] * n, pa.string()),
        "run_id": pa.array([run_id] * n, pa.string()),
        "processed_at": pa.array([now] * n, ERRORS_SCHEMA.field("processed_at").type),
    }, schema=ERRORS_SCHEMA)


def make_datasink(output_uri: str, run_id: str, model: str, model_id: str, rows_per_file: int = 2000,
                  storage_options: dict | None = None):
    """A Ray Data `Datasink` writing both tables in one pass; `.counts` after the write.

    Built in a function so this module imports without Ray (readers of the tables need none).
    """
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    options = storage.s3_options() if storage_options is None else storage_options  # driver's

    class _MaskTableDatasink(Datasink):
        def __init__(self) -> None:
            self.output_uri = output_uri
            self.counts: dict = {}

        @property
        def min_rows_per_write(self) -> int:
            return rows_per_file  # files of a sensible size (~5–10 MB of maps), not one per batch

        def get_name(self) -> str:
            return "MaskTables"

        def write(self, blocks, ctx) -> dict:
            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [t for t in tables if t.num_rows]
            counts = {"masks": 0, "errors": 0, "skipped": 0, "files": []}
            if not tables:
                return counts
            table = pa.concat_tables(tables, promote_options="permissive")
            status = table.column("status")
            now = datetime.now(timezone.utc)
            ok = table.filter(pc.equal(status, STATUS_OK))
            bad = table.filter(pc.equal(status, STATUS_ERROR))
            counts["skipped"] = int(pc.sum(pc.equal(status, STATUS_SKIP)).as_py() or 0)
            for sub, directory, build in (
                    (ok, MASKS_DIR, lambda t: masks_rows(t, model, model_id, run_id, now)),
                    (bad, ERRORS_DIR, lambda t: error_rows(t, model_id, run_id, now))):
                if not sub.num_rows:
                    continue
                out = build(sub)
                name = _file_name(run_id, out.column("key").to_pylist())
                storage.write_bytes(storage.join_uri(output_uri, directory, name), _parquet_bytes(out),
                                    options)
                counts["masks" if directory == MASKS_DIR else "errors"] += out.num_rows
                counts["files"].append(f"{directory}/{name}")
            return counts

        def on_write_complete(self, write_result) -> None:
            total = {"masks": 0, "errors": 0, "skipped": 0, "files": []}
            for r in write_result.write_returns:
                for k in ("masks", "errors", "skipped"):
                    total[k] += r[k]
                total["files"].extend(r["files"])
            self.counts = total

    return _MaskTableDatasink()


# ---------------------------------------------------------------------------------------------
# Table state, reconciliation and the run summary (driver side).

@dataclass
class TableState:
    """The tables' key columns, kept as Arrow: the driver holds one row per stored key, and
    Python objects per key cost far more than their Arrow bytes (the end of a 100k run grew
    the driver by 111 MiB when reconciling went through Python dicts and sets, by 79 MiB
    after; BENCHMARKS.md, memory)."""

    masks: pa.Table  # key, source_uri, model_id, __file
    errors: pa.Table  # key, source_uri, processed_at, __file

    @property
    def mask_keys(self) -> pa.ChunkedArray:
        return self.masks.column("key")

    @property
    def model_ids(self) -> set[str]:
        return set(pc.unique(self.masks.column("model_id")).to_pylist()) if self.masks.num_rows else set()


def _list_parquet(uri: str) -> list[str]:
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        return []
    proto = storage.split_uri(uri)[0]
    return sorted(storage.to_uri(proto, p) for p in fs.find(path)
                  if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_")))


def _read_parquet(file_uri: str, columns: list[str] | None = None, fs=None) -> pa.Table:
    """One Parquet file (or some of its columns), read through fsspec (s3fs on S3).

    Not through pyarrow's native S3 client: it does not retry a throttled (503 SlowDown) or
    failed (500) ranged GET whose XML error body is larger than the range asked for (the AWS
    C++ SDK reports "Failed to flush response stream", a non-retryable INTERNAL_FAILURE), and
    the key column of a masks file is such a small range. s3fs retries those like any other
    request. `cache_type="none"`: one ranged GET per read, so only the footer and the
    requested columns are fetched, as with the native client. Pass `fs` (from
    `storage.filesystem`) when reading many files: making an S3 client costs far more than
    reading a footer."""
    if fs is None:
        fs = storage.filesystem(file_uri)[0]
    with fs.open(storage.split_uri(file_uri)[1], "rb", cache_type="none") as f:
        return pq.read_table(f, columns=columns)


def _read_columns(files: list[str], columns: list[str]) -> pa.Table:
    parts = []
    fs = storage.filesystem(files[0])[0] if files else None
    for f in files:
        t = _read_parquet(f, columns, fs)
        # which file a row came from, dictionary-encoded: one string per file, not per row
        indices = pa.array(np.zeros(t.num_rows, np.int32))
        parts.append(t.append_column("__file", pa.DictionaryArray.from_arrays(indices, pa.array([f]))))
    if not parts:
        return pa.table({**{c: pa.array([], pa.string()) for c in columns},
                         "__file": pa.array([], pa.dictionary(pa.int32(), pa.string()))})
    return pa.concat_tables(parts, promote_options="permissive")


def read_table_state(output_uri: str) -> TableState:
    """Keys (and a few small columns) of both tables: no maps are read."""
    return TableState(
        masks=_read_columns(_list_parquet(storage.join_uri(output_uri, MASKS_DIR)),
                            ["key", "source_uri", "model_id"]),
        errors=_read_columns(_list_parquet(storage.join_uri(output_uri, ERRORS_DIR)),
                             ["key", "source_uri", "processed_at"]),
    )


def _rewrite_masks_file(file_uri: str, drop: set[str], dedupe: set[str]) -> None:
    """Rewrite one masks file without the keys in `drop`, keeping only the first row of each
    key in `dedupe`; the new file is written before the old one is deleted."""
    path = storage.split_uri(file_uri)[1]
    t = _read_parquet(file_uri).cast(MASKS_SCHEMA)
    seen: set[str] = set()
    keep = []
    for i, key in enumerate(t.column("key").to_pylist()):
        if key in drop or (key in dedupe and key in seen):
            continue
        seen.add(key)
        keep.append(i)
    kept = t.take(pa.array(keep, pa.int64()))
    proto, directory = storage.split_uri(file_uri)[0], posixpath.dirname(path)
    if kept.num_rows:
        name = _file_name("reconciled", kept.column("key").to_pylist())
        storage.write_bytes(storage.to_uri(proto, posixpath.join(directory, name)), _parquet_bytes(kept))
        if posixpath.join(directory, name) == path:
            return
    storage.filesystem(file_uri)[0].rm(path)


def _reconcile_masks(state: TableState, model_id: str, run_id: str, stats: dict) -> list[dict]:
    """Fix duplicate keys in `masks`; return the DuplicateKey error rows to record."""
    m = state.masks
    if not m.num_rows:
        return []
    counts = pc.value_counts(m.column("key"))  # in Arrow: duplicates are rare, keys many
    dup_keys = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if not len(dup_keys):
        return []
    by_key: dict[str, list] = {}
    for r in m.filter(pc.is_in(m.column("key"), value_set=dup_keys)).to_pylist():
        by_key.setdefault(r["key"], []).append(r)
    drop: dict[str, set[str]] = {}
    dedupe: dict[str, set[str]] = {}
    errors = []
    now = datetime.now(timezone.utc)
    for key, group in by_key.items():
        sources = sorted({r["source_uri"] for r in group})
        files = sorted({r["__file"] for r in group})
        if len(sources) == 1:  # the same input written twice (a retried task): keep one
            dedupe.setdefault(files[0], set()).add(key)
            for f in files[1:]:
                drop.setdefault(f, set()).add(key)
            stats["duplicate_masks_removed"] += len(group) - 1
        else:  # two inputs share a key: neither is the right answer to store
            for f in files:
                drop.setdefault(f, set()).add(key)
            stats["ambiguous_keys"] += 1
            errors.append({
                "key": key, "source_uri": sources[0], "source_fingerprint": None, "stage": "read",
                "error_type": "DuplicateKey",
                "error_message": f"{len(sources)} inputs share this key: " + ", ".join(sources[:5]),
                "model_id": model_id, "run_id": run_id, "processed_at": now})
    for f in sorted(set(drop) | set(dedupe)):
        _rewrite_masks_file(f, drop.get(f, set()), dedupe.get(f, set()))
    return errors


def _reconcile_errors(output_uri: str, extra: list[dict], stats: dict) -> None:
    """One row per key, the newest, and none for keys that have a mask.

    Error tables are small (a fraction of the inputs), so when anything needs changing the
    whole table is rewritten as one file: new file first, then the old ones are deleted."""
    files = _list_parquet(storage.join_uri(output_uri, ERRORS_DIR))
    if not files and not extra:
        return
    mask_keys = _read_columns(_list_parquet(storage.join_uri(output_uri, MASKS_DIR)), ["key"]).column("key")
    parts = []
    fs = storage.filesystem(files[0])[0] if files else None
    for f in files:
        parts.append(_read_parquet(f, fs=fs).cast(ERRORS_SCHEMA))
    if extra:
        parts.append(pa.Table.from_pylist(extra, schema=ERRORS_SCHEMA))
    if not parts:
        return
    table = pa.concat_tables(parts)
    newest: dict[str, int] = {}
    stamps = table.column("processed_at").to_pylist()
    has_mask = pc.is_in(table.column("key"), value_set=mask_keys.combine_chunks()).to_pylist()
    for i, key in enumerate(table.column("key").to_pylist()):
        if has_mask[i]:
            continue
        j = newest.get(key)
        if j is None or stamps[i] >= stamps[j]:
            newest[key] = i
    if not extra and len(newest) == table.num_rows:
        return  # already exact: nothing to rewrite
    final = table.take(pa.array(sorted(newest.values()), pa.int64()))
    stats["errors_removed"] = table.num_rows - final.num_rows
    written = None
    if final.num_rows:
        written = storage.join_uri(output_uri, ERRORS_DIR,
                                   _file_name("reconciled", final.column("key").to_pylist()))
        storage.write_bytes(written, _parquet_bytes(final))
    for f in files:
        if f != written:
            fs, path = storage.filesystem(f)
            fs.rm(path)


def reconcile(output_uri: str, model_id: str, run_id: str) -> dict:
    """Make the tables exact after a run (or a killed run): every key once, in one table.

    - A key in `masks` more than once from the same source (a retried task): keep one row.
    - A key in `masks` from different sources (two inputs share a key): remove those rows and
      record one `DuplicateKey` error naming the sources.
    - `mask_errors`: drop keys that now have a mask, keep the newest row per key.
    Rewrites write the new file before deleting the old, so a crash in between leaves a
    duplicate that the next run's reconcile removes.
    """
    stats = {"duplicate_masks_removed": 0, "ambiguous_keys": 0, "errors_removed": 0}
    extra = _reconcile_masks(read_table_state(output_uri), model_id, run_id, stats)
    _reconcile_errors(output_uri, extra, stats)
    return stats


def ensure_tables(output_uri: str, run_id: str) -> None:
    """Give a table with no rows one empty file, so every reader finds both tables and their
    schema (DuckDB and pyarrow fail on a folder with no Parquet files)."""
    for directory, schema in ((MASKS_DIR, MASKS_SCHEMA), (ERRORS_DIR, ERRORS_SCHEMA)):
        if not _list_parquet(storage.join_uri(output_uri, directory)):
            storage.write_bytes(storage.join_uri(output_uri, directory, f"part-{run_id}-empty.parquet"),
                                _parquet_bytes(schema.empty_table()))


def write_run_summary(output_uri: str, summary: dict) -> None:
    """`_run.json`, written last: its presence marks a finished run."""
    storage.write_bytes(storage.join_uri(output_uri, RUN_SUMMARY),
                        json.dumps(summary, indent=2, sort_keys=True, default=str).encode())
