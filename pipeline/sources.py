"""Sources: plan the input on the driver, then read bytes inside the pipeline.

Planning lists *units* without reading any image bytes: one unit per loose file (its key is
known), one per WebDataset shard or Parquet file (keys are discovered when the unit is read),
or one per manifest row. Reading expands units into one row per image with its bytes.
Listing is one recursive listing (paginated on object stores); the fingerprint of every row
comes from it (size + ETag or mtime), so incremental runs can skip unchanged inputs unread.

Keys (DESIGN §2): loose files → path relative to the input root; WebDataset → `<shard path
relative to root>/<sample key>`, or the original key a sample packed by this project carries;
Parquet and manifests → the user-named key column. A key seen twice in one unit becomes one
error row naming both sources: an ambiguous key has no right answer to store.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa

from pipeline import shards, storage
from pipeline.config import SourceConfig
from pipeline.schema import STATUS_ERROR, STATUS_OK, STATUS_SKIP, short_message

__all__ = ["Plan", "plan_source", "read_source", "READ_SCHEMA", "UNIT_SCHEMA", "detect_kind"]

UNIT_SCHEMA = pa.schema([
    ("unit_uri", pa.string()),  # the object to read
    ("unit_kind", pa.string()),  # files | webdataset | parquet | manifest
    ("key", pa.string()),  # known up front for files and manifests, else null
    ("fingerprint", pa.string()),
    ("size", pa.int64()),
    ("root", pa.string()),  # the listed root (for shard keys relative to it)
])

READ_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source_uri", pa.string()),
    ("source_fingerprint", pa.string()),
    ("data", pa.binary()),
    ("status", pa.string()),
    ("error_stage", pa.string()),
    ("error_type", pa.string()),
    ("error_message", pa.string()),
])

_SHARD_EXTS = (".tar", ".tar.gz", ".tgz")


@dataclass
class Plan:
    kind: str
    root: str
    units: pa.Table  # UNIT_SCHEMA
    listed_files: int

    @property
    def keys_known(self) -> bool:
        return self.kind in ("files", "manifest")

    @property
    def known_rows(self) -> int | None:
        """The rows the units will give, where the plan knows it: one per unit for files and
        manifests. A shard or Parquet file holds a number not known until it is read."""
        return self.units.num_rows if self.keys_known else None


def detect_kind(uri: str, entries: list[storage.FileEntry]) -> str:
    lower = uri.lower().rstrip("/")
    if lower.endswith(_SHARD_EXTS):
        return "webdataset"
    if lower.endswith(".parquet"):
        return "parquet"
    names = [e.relpath.lower() for e in entries]
    if names and all(n.endswith(_SHARD_EXTS) for n in names):
        return "webdataset"
    if names and all(n.endswith(".parquet") for n in names):
        return "parquet"
    return "files"


def _units_table(kind: str, root: str, entries: Iterable[storage.FileEntry], with_keys: bool) -> pa.Table:
    entries = list(entries)
    return pa.table({
        "unit_uri": [e.uri for e in entries],
        "unit_kind": [kind] * len(entries),
        "key": [e.relpath if with_keys else None for e in entries],
        "fingerprint": [e.fingerprint for e in entries],
        "size": [e.size for e in entries],
        "root": [root] * len(entries),
    }, schema=UNIT_SCHEMA)


def plan_source(cfg: SourceConfig) -> Plan:
    """List the input (no image bytes read) and return its units."""
    if cfg.kind == "manifest":
        from pipeline.manifest import plan_manifest  # noqa: WPS433 (optional source)

        return plan_manifest(cfg)
    all_entries = storage.list_files(cfg.uri, extensions=None)
    kind = cfg.kind if cfg.kind != "auto" else detect_kind(cfg.uri, all_entries)
    root = cfg.uri
    proto, path = storage.split_uri(cfg.uri)
    fs, _ = storage.filesystem(cfg.uri)
    if fs.isfile(path):
        root = storage.to_uri(proto, posixpath.dirname(path))
    if kind == "files":
        exts = tuple(e.lower() for e in cfg.extensions)
        entries = [e for e in all_entries if e.relpath.lower().endswith(exts)]
        return Plan(kind, root, _units_table(kind, root, entries, with_keys=True), len(all_entries))
    if kind == "webdataset":
        entries = [e for e in all_entries if e.relpath.lower().endswith(_SHARD_EXTS)]
    elif kind == "parquet":
        entries = [e for e in all_entries if e.relpath.lower().endswith(".parquet")]
        if entries:
            _check_parquet_columns(entries[0].uri, cfg)
    else:
        raise ValueError(f"unknown source kind {kind!r}")
    return Plan(kind, root, _units_table(kind, root, entries, with_keys=False), len(all_entries))


def _check_parquet_columns(uri: str, cfg: SourceConfig) -> None:
    """Fail at plan time, on the driver, when the key or image column does not exist."""
    import pyarrow.parquet as pq

    pafs, path = storage.pyarrow_filesystem(uri)
    names = pq.read_schema(pafs.open_input_file(path)).names
    missing = [c for c in (cfg.key_column, cfg.image_column) if c not in names]
    if missing:
        raise storage.StorageError(
            f"{uri} has no column {', '.join(map(repr, missing))} (columns: {', '.join(names)}); "
            "set --key-column / --image-column")


# ---------------------------------------------------------------------------------------------
# Reading units into rows (runs inside Ray tasks).

_SKIP_CACHE: dict[str, frozenset] = {}


def _skip_keys(ref: Any) -> frozenset:
    if ref is None:
        return frozenset()
    import ray

    k = ref.hex()
    if k not in _SKIP_CACHE:
        _SKIP_CACHE.clear()  # one run's set at a time per worker process
        _SKIP_CACHE[k] = ray.get(ref)
    return _SKIP_CACHE[k]


class _Rows:
    """Accumulates READ_SCHEMA rows."""

    def __init__(self) -> None:
        self.cols: dict[str, list] = {f.name: [] for f in READ_SCHEMA}

    def add(self, key: str, uri: str, fp: str, data: bytes | None, status: str = STATUS_OK,
            stage: str | None = None, etype: str | None = None, msg: str | None = None) -> None:
        for name, value in zip(self.cols, (key, uri, fp, data, status, stage, etype, msg)):
            self.cols[name].append(value)

    def table(self) -> pa.Table:
        return pa.table(self.cols, schema=READ_SCHEMA)


def _read_error(rows: _Rows, key: str, uri: str, fp: str, exc: BaseException) -> None:
    rows.add(key, uri, fp, None, STATUS_ERROR, "read", type(exc).__name__, short_message(exc))


def _read_files(units: pa.Table, rows: _Rows, options: dict) -> None:
    uris = units.column("unit_uri").to_pylist()
    keys = units.column("key").to_pylist()
    fps = units.column("fingerprint").to_pylist()
    for uri, key, fp, data in zip(uris, keys, fps, storage.read_many(uris, options)):
        if isinstance(data, BaseException):
            _read_error(rows, key, uri, fp, data)
        else:
            rows.add(key, uri, fp, data)


def _emit_unique(rows: _Rows, samples: list[tuple[str, str, str, bytes | None, tuple | None]],
                 skip: frozenset) -> None:
    """Rows of one unit, with keys seen twice in it turned into one error row."""
    by_key: dict[str, list] = {}
    for s in samples:
        by_key.setdefault(s[0], []).append(s)
    for key, group in by_key.items():
        if len(group) > 1:
            sources = ", ".join(g[1] for g in group[:5])
            rows.add(key, group[0][1], group[0][2], None, STATUS_ERROR, "read", "DuplicateKey",
                     short_message(f"{len(group)} inputs share this key: {sources}"))
            continue
        key, uri, fp, data, err = group[0]
        if key in skip:
            rows.add(key, uri, fp, None, STATUS_SKIP)
        elif err is not None:
            rows.add(key, uri, fp, None, STATUS_ERROR, "read", err[0], err[1])
        else:
            rows.add(key, uri, fp, data)


def _safe_key(key: str) -> str:
    # Keys are strings, never paths we open; still, normalise separators so the same sample
    # gets the same key on every platform.
    return key.replace("\\", "/")


def _read_shard(unit: dict, cfg: SourceConfig, rows: _Rows, skip: frozenset) -> None:
    uri, fp, root = unit["unit_uri"], unit["fingerprint"], unit["root"]
    rel = posixpath.relpath(storage.split_uri(uri)[1], storage.split_uri(root)[1])
    samples = []
    try:
        fs, path = storage.filesystem(uri, cfg.storage_options)
        with fs.open(path, "rb") as f:
            for sample_key, members in shards.iter_samples(f):
                key = shards.original_key(members) or f"{rel}/{sample_key}"
                key = _safe_key(key)
                found = shards.image_member(members, cfg.image_member)
                if found is None:
                    wanted = cfg.image_member or "/".join(shards.IMAGE_EXTS)
                    samples.append((key, f"{uri}#{sample_key}", fp, None,
                                    ("NoImageMember", f"sample has no {wanted} member "
                                                      f"(members: {', '.join(sorted(members))})")))
                    continue
                ext, data = found
                samples.append((key, f"{uri}#{sample_key}.{ext}", fp, data, None))
    except Exception as exc:  # a corrupt or unreachable shard: its samples so far, then one error
        _emit_unique(rows, samples, skip)
        _read_error(rows, f"{rel}", uri, fp, exc)
        return
    _emit_unique(rows, samples, skip)


def _read_parquet_file(unit: dict, cfg: SourceConfig, rows: _Rows, skip: frozenset) -> None:
    import pyarrow.parquet as pq

    uri, fp = unit["unit_uri"], unit["fingerprint"]
    samples = []
    try:
        pafs, path = storage.pyarrow_filesystem(uri, cfg.storage_options)
        pf = pq.ParquetFile(pafs.open_input_file(path))
        names = pf.schema_arrow.names
        for col in (cfg.key_column, cfg.image_column):
            if col not in names:
                raise KeyError(f"column {col!r} not in {uri} (columns: {', '.join(names)})")
        offset = 0
        for batch in pf.iter_batches(columns=[cfg.key_column, cfg.image_column], batch_size=256):
            keys = batch.column(0).to_pylist()
            datas = batch.column(1).to_pylist()
            for j, (key, data) in enumerate(zip(keys, datas)):
                src = f"{uri}#row={offset + j}"
                if key is None or key == "":
                    samples.append((f"{uri}#row={offset + j}", src, fp, None,
                                    ("MissingKey", f"row {offset + j} has no {cfg.key_column}")))
                elif data is None:
                    samples.append((str(key), src, fp, None, ("EmptyInput", "image column is null")))
                else:
                    samples.append((str(key), src, fp, bytes(data), None))
            offset += batch.num_rows
    except KeyError as exc:
        # A missing column is a configuration error for the whole table: fail the job loudly.
        raise ValueError(str(exc).strip('"')) from None
    except Exception as exc:
        _emit_unique(rows, samples, skip)
        _read_error(rows, posixpath.basename(uri), uri, fp, exc)
        return
    _emit_unique(rows, samples, skip)


def expand_units(units: pa.Table, cfg: SourceConfig, skip_ref: Any = None) -> pa.Table:
    """Ray Data map function: a batch of units → READ_SCHEMA rows with image bytes."""
    rows = _Rows()
    kind = units.column("unit_kind")[0].as_py() if units.num_rows else "files"
    if kind == "files":
        _read_files(units, rows, cfg.storage_options)
    elif kind == "manifest":
        from pipeline.manifest import read_manifest_units

        read_manifest_units(units, rows, cfg.storage_options)
    else:
        skip = _skip_keys(skip_ref)
        for unit in units.to_pylist():
            if kind == "webdataset":
                _read_shard(unit, cfg, rows, skip)
            else:
                _read_parquet_file(unit, cfg, rows, skip)
    return rows.table()


def read_source(plan: Plan, cfg: SourceConfig, skip_ref: Any = None, num_cpus: float = 0.25):
    """A lazy Ray Dataset of READ_SCHEMA rows for the planned units.

    Files and manifest rows are read `files_per_read_task` at a time; each shard or Parquet
    file is one task. I/O-bound, so tasks reserve a fraction of a CPU.
    """
    import ray

    per_block = cfg.files_per_read_task if plan.keys_known else 1
    n = plan.units.num_rows
    blocks = [plan.units.slice(i, per_block) for i in range(0, n, per_block)] or [plan.units]
    ds = ray.data.from_arrow(blocks)
    return ds.map_batches(expand_units, batch_format="pyarrow", batch_size=per_block,
                          fn_kwargs={"cfg": cfg, "skip_ref": skip_ref}, num_cpus=num_cpus)
