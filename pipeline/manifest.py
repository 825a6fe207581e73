"""Manifest inputs: a table of URIs instead of a listing (the shape of Ray's large-scale examples).

A manifest is a Parquet or CSV table (one file, or a prefix holding several `.parquet`, `.csv`,
`.csv.gz` files) with one row per image:

    uri (required, `--uri-column`)   where the bytes are: `s3://b/k.jpg`, `gs://…`, `/abs/path`,
                                     `file:///abs/path`, or a path relative to the manifest
                                     file's own folder. Rows may mix buckets and filesystems.
    key (optional, `--key-column`)   the row's key. Without the column, the key is the URI's
                                     path without scheme and bucket/host: `s3://b/dir/x.jpg` →
                                     `dir/x.jpg`, `/data/x.jpg` → `data/x.jpg`; a relative URI is
                                     its own key (`img/x.jpg` → `img/x.jpg`).
    fingerprint | etag | size        (optional) what incremental runs compare. A manifest cannot
                                     be fingerprinted without listing or HEADing every object,
                                     which is what a manifest exists to avoid; so the fingerprint
                                     is the `fingerprint` column, else `<size>-<etag>` from
                                     whichever of `size`/`etag` exist (the listing's format),
                                     else "". With "" an incremental run can only tell new keys
                                     from old ones, not a changed object under an old key.

Planning (`plan_manifest`, on the driver) reads the table, derives keys and fingerprints with
Arrow compute (no per-row Python on the common path), and decides the rows that cannot be read
at all: a key given twice (one `DuplicateKey` error per key, as `sources._emit_unique` does for
shards), a missing URI, a missing key. Those travel as units like the others, flagged in two
extra columns (`error_type`, `error_message`, null for readable rows) on top of `UNIT_SCHEMA`,
so that every later step (skip done keys, slice into read tasks) treats them uniformly and the
read step turns them into error rows. Reading (`read_manifest_units`, in Ray tasks) fetches the
bytes concurrently: no listing of any bucket is ever needed.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.config import SourceConfig
from pipeline.schema import STATUS_ERROR, short_message
from pipeline.sources import UNIT_SCHEMA, Plan

__all__ = ["plan_manifest", "read_manifest_units", "read_manifest_table",
           "MANIFEST_UNIT_SCHEMA", "MANIFEST_EXTENSIONS", "is_manifest_uri", "unit_errors"]

MANIFEST_EXTENSIONS = (".parquet", ".csv", ".csv.gz")
MANIFEST_UNIT_SCHEMA = UNIT_SCHEMA.append(pa.field("error_type", pa.string())).append(
    pa.field("error_message", pa.string()))

_DEFAULT_KEY_COLUMN = "key"
_SCHEME = r"^[A-Za-z][A-Za-z0-9+.\-]*://"
# Everything before the key part of a URI: scheme + bucket/host, leading slashes, leading "./".
_KEY_PREFIX = r"^(?:[A-Za-z][A-Za-z0-9+.\-]*://[^/]*)?/*(?:\./)*"


def is_manifest_uri(uri: str) -> bool:
    """A single manifest file, judged by its name (a prefix needs `--source manifest`)."""
    return storage.split_uri(uri)[1].lower().endswith(MANIFEST_EXTENSIONS)


# ---------------------------------------------------------------------------------------------
# Planning (driver)

def _manifest_files(cfg: SourceConfig) -> list[str]:
    fs, path = storage.filesystem(cfg.uri, cfg.storage_options)
    try:
        if fs.isfile(path):
            return [cfg.uri]
    except OSError as exc:
        raise storage.StorageError(f"cannot read manifest {cfg.uri!r}: {exc}") from None
    files = [e.uri for e in storage.list_files(cfg.uri, extensions=MANIFEST_EXTENSIONS)]
    if not files:
        raise storage.StorageError(
            f"no manifest files ({', '.join(MANIFEST_EXTENSIONS)}) under {cfg.uri!r}")
    return files


def _wanted_columns(cfg: SourceConfig) -> list[str]:
    return [cfg.uri_column, cfg.key_column, "fingerprint", "etag", "size"]


def read_manifest_table(uri: str, cfg: SourceConfig) -> pa.Table:
    """The columns of one manifest file this module uses (those it has), as read."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    wanted = _wanted_columns(cfg)
    lower = uri.lower()
    try:
        if lower.endswith(".parquet"):
            pafs, path = storage.pyarrow_filesystem(uri, cfg.storage_options)
            names = pq.read_schema(pafs.open_input_file(path)).names
            table = pq.read_table(path, filesystem=pafs,
                                  columns=[c for c in dict.fromkeys(wanted) if c in names])
        else:
            fs, path = storage.filesystem(uri, cfg.storage_options)
            # Keys, URIs and ETags are text even when they look like numbers ("0001").
            text = {c: pa.string() for c in wanted if c != "size"}
            with fs.open(path, "rb", compression="infer") as f:
                table = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(column_types=text))
            table = table.select([c for c in dict.fromkeys(wanted) if c in table.column_names])
    except (OSError, pa.ArrowInvalid) as exc:
        raise storage.StorageError(f"cannot read manifest {uri!r}: {short_message(exc)}") from None
    if cfg.uri_column not in table.column_names:
        raise storage.StorageError(
            f"manifest {uri!r} has no column {cfg.uri_column!r}; set --uri-column")
    if cfg.key_column not in table.column_names and cfg.key_column != _DEFAULT_KEY_COLUMN:
        # The default key column is optional; a column the user named must exist (a typo
        # would otherwise silently key every row by its URI).
        raise storage.StorageError(
            f"manifest {uri!r} has no column {cfg.key_column!r} (given as --key-column)")
    return table


def _text(table: pa.Table, name: str) -> pa.ChunkedArray | None:
    if name not in table.column_names:
        return None
    return pc.cast(table.column(name), pa.string())


def _blank(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """True where a text value is null or only whitespace."""
    return pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True)


def _fingerprints(table: pa.Table) -> pa.ChunkedArray:
    n = table.num_rows
    given = _text(table, "fingerprint")
    if given is not None:
        return pc.fill_null(given, "")
    etag = _text(table, "etag")
    size = _text(table, "size")
    if etag is not None:
        etag = pc.utf8_trim(pc.fill_null(etag, ""), '"')
    if etag is not None and size is not None:
        # The listing's `<size>-<etag>`; a row missing one of them keeps the other alone.
        return pc.utf8_trim(pc.binary_join_element_wise(pc.fill_null(size, ""), etag, "-"), "-")
    if etag is not None:
        return etag
    if size is not None:
        return pc.fill_null(size, "")
    return pa.chunked_array([pa.array([""] * n, pa.string())])


def _resolve(raw: pa.ChunkedArray, manifest_uri: str) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """(URI to read, key derived from the URI) for every row; nulls stay null.

    Absolute URIs are read as written (`file://` becomes a plain path, as the listing gives
    local files); relative ones are resolved against the manifest file's folder.
    """
    proto, path = storage.split_uri(manifest_uri)
    base = storage.to_uri(proto, posixpath.dirname(path))
    derived_key = pc.replace_substring_regex(raw, _KEY_PREFIX, "")
    absolute = pc.or_(pc.match_substring_regex(raw, _SCHEME), pc.starts_with(raw, "/"))
    local = pc.replace_substring_regex(raw, r"^file://(?:localhost)?", "")
    relative = pc.binary_join_element_wise(base, pc.replace_substring_regex(raw, r"^(?:\./)+", ""), "/")
    read_uri = pc.if_else(absolute, local, relative)
    if pc.any(pc.and_(pc.invert(absolute), pc.match_substring(raw, ".."))).as_py():
        # `..` in a relative URI is resolved by the local filesystem but would be a literal
        # key part on object stores: normalise those few rows in Python.
        read_uri = pa.chunked_array([pa.array(
            [u if (a or u is None or ".." not in u) else storage.to_uri(proto, posixpath.normpath(
                storage.split_uri(u)[1])) for u, a in zip(read_uri.to_pylist(), absolute.to_pylist())],
            pa.string())])
    return read_uri, derived_key


def _manifest_units(table: pa.Table, manifest_uri: str, cfg: SourceConfig) -> pa.Table:
    """MANIFEST_UNIT_SCHEMA rows of one manifest file (duplicates are decided across files)."""
    n = table.num_rows
    raw = _text(table, cfg.uri_column)
    read_uri, derived_key = _resolve(raw, manifest_uri)
    row_ids = pa.array([f"{manifest_uri}#row={i}" for i in range(n)], pa.string()) if n else \
        pa.array([], pa.string())
    missing_uri = _blank(raw)
    given = _text(table, cfg.key_column)
    if given is not None:
        missing_key = _blank(given)
        key_reason = f"row has no {cfg.key_column}"
        keys = pc.if_else(missing_key, row_ids, given)
    else:
        # Without a URI there is no key to derive: the row is reported under its row id.
        missing_key = pc.and_(pc.invert(missing_uri), _blank(derived_key))
        key_reason = f"cannot derive a key from the URI (no {cfg.key_column!r} column)"
        keys = pc.if_else(pc.or_(missing_key, missing_uri), row_ids, derived_key)
    none = pa.scalar(None, pa.string())
    error_type = pc.if_else(missing_uri, "MissingURI", pc.if_else(missing_key, "MissingKey", none))
    error_message = pc.if_else(missing_uri, f"row has no {cfg.uri_column}",
                               pc.if_else(missing_key, key_reason, none))
    return pa.table({
        "unit_uri": pc.if_else(missing_uri, pa.scalar(manifest_uri), read_uri),
        "unit_kind": pa.array(["manifest"] * n, pa.string()),
        "key": keys,
        "fingerprint": _fingerprints(table),
        "size": _sizes(table),
        "root": pa.array([cfg.uri] * n, pa.string()),
        "error_type": error_type,
        "error_message": error_message,
    }, schema=MANIFEST_UNIT_SCHEMA)


def _sizes(table: pa.Table) -> pa.ChunkedArray:
    if "size" in table.column_names:
        try:
            return pc.cast(table.column("size"), pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass  # sizes that are not integers are only informative: drop them
    return pa.chunked_array([pa.nulls(table.num_rows, pa.int64())])


def _mark_duplicates(units: pa.Table) -> pa.Table:
    """Replace every group of rows sharing a key with one DuplicateKey error unit."""
    counts = units.group_by("key").aggregate([("key", "count")])
    dup_keys = counts.filter(pc.greater(counts.column("key_count"), 1)).column("key")
    if len(dup_keys) == 0:
        return units
    is_dup = pc.is_in(units.column("key"), value_set=dup_keys.combine_chunks())
    unique = units.filter(pc.invert(is_dup))
    groups: dict[str, list[dict]] = {}
    for row in units.filter(is_dup).to_pylist():
        groups.setdefault(row["key"], []).append(row)
    errors = []
    for key, group in groups.items():
        sources = ", ".join(g["unit_uri"] for g in group[:5])
        first = dict(group[0])
        first["error_type"] = "DuplicateKey"
        first["error_message"] = short_message(f"{len(group)} inputs share this key: {sources}")
        errors.append(first)
    return pa.concat_tables([unique, pa.Table.from_pylist(errors, schema=MANIFEST_UNIT_SCHEMA)])


def plan_manifest(cfg: SourceConfig) -> Plan:
    """Read the manifest on the driver and return one unit per row, sorted by key.

    `listed_files` is the number of manifest rows read (each names one object).
    """
    parts = []
    for uri in _manifest_files(cfg):
        parts.append(_manifest_units(read_manifest_table(uri, cfg), uri, cfg))
    units = pa.concat_tables(parts) if parts else MANIFEST_UNIT_SCHEMA.empty_table()
    rows = units.num_rows
    units = _mark_duplicates(units).sort_by("key")
    return Plan("manifest", cfg.uri, units.combine_chunks(), rows)


# ---------------------------------------------------------------------------------------------
# Reading (Ray tasks)

def unit_errors(units: pa.Table) -> tuple[list, list]:
    """The (error_type, error_message) columns of units, all None for plain UNIT_SCHEMA units."""
    if "error_type" in units.column_names:
        return units.column("error_type").to_pylist(), units.column("error_message").to_pylist()
    return [None] * units.num_rows, [None] * units.num_rows


def read_manifest_units(units: pa.Table, rows, storage_options: dict | None) -> None:
    """Append one READ_SCHEMA row per unit to `rows` (a `pipeline.sources._Rows`)."""
    from pipeline.sources import _read_error

    uris = units.column("unit_uri").to_pylist()
    keys = units.column("key").to_pylist()
    fps = units.column("fingerprint").to_pylist()
    etypes, emessages = unit_errors(units)
    readable = [i for i, e in enumerate(etypes) if e is None]
    fetched = dict(zip(readable, storage.read_many([uris[i] for i in readable], storage_options)))
    for i, (uri, key, fp) in enumerate(zip(uris, keys, fps)):
        if etypes[i] is not None:
            rows.add(key, uri, fp, None, STATUS_ERROR, "read", etypes[i], emessages[i])
        elif isinstance(fetched[i], BaseException):
            _read_error(rows, key, uri, fp, fetched[i])
        else:
            rows.add(key, uri, fp, fetched[i])
