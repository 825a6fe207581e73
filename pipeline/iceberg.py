"""The nightly job's two Apache Iceberg tables: catalog, table creation, reads, and chunk commits.

Tables `<namespace>.masks` and `<namespace>.mask_errors` carry the columns of DESIGN §3
(`pipeline.schema.MASKS_SCHEMA` / `ERRORS_SCHEMA`) with two storage decisions:

- `map_height` / `map_width` are Iceberg `int` (int32): Iceberg has no 16-bit integer type.
  Rows are cast from the pipeline's int16 on write; readers get int32 (same values).
- `processed_at` is `timestamptz` (microseconds, UTC), the Iceberg form of timestamp[us, UTC].

`key` is the required identifier field of both tables (engines that upsert by identifier, e.g.
Spark or Flink, find it there) and has exact (`full`) min/max column metrics: Ray's upsert finds
the files to rewrite with a min/max range over the chunk's keys, and the default
`truncate(16)` bounds make every file with a common 16-character key prefix a candidate.
Payload columns keep only counts: 16-byte bounds of a PNG or a map are metadata nobody can use.

Catalog: any pyiceberg catalog (`load_catalog` properties). The default is pyiceberg's SQL
catalog on a SQLite file inside a local warehouse. For an S3 warehouse, pyiceberg's FileIO gets
endpoint, credentials and region from the driver's AWS environment as explicit properties;
they travel inside the FileIO object to Ray's write and rewrite tasks, whose own environment
may have none of them.

Commits: one chunk of pipeline output is written in one pass (`ChunkSink`, a Ray Data datasink
around two of Ray's `IcebergDatasink`s) and committed per table in an order that the next run's
planning repairs if the process dies between two commits; see `ChunkSink.on_write_complete`.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.compute as pc

from ray.data import Datasink

from pipeline import storage
from pipeline.schema import ERRORS_SCHEMA, MASKS_SCHEMA, STATUS_ERROR, STATUS_OK, STATUS_SKIP

__all__ = ["CatalogSettings", "MaskTables", "MASKS_TABLE", "ERRORS_TABLE", "MASKS_ARROW",
           "ERRORS_ARROW", "masks_iceberg_schema", "errors_iceberg_schema", "open_tables",
           "load_tables", "read_columns", "delete_keys", "ChunkSink", "ChunkOutcome", "CatalogError",
           "current_data_files", "snapshot_ids"]

log = logging.getLogger("u2net_ray")

MASKS_TABLE, ERRORS_TABLE = "masks", "mask_errors"


class CatalogError(RuntimeError):
    """The catalog cannot be configured or reached (a user-fixable, job-level problem)."""


def _int16_to_int32(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_type(pa.int32()) if f.type == pa.int16() else f for f in schema])


# What the job writes: the pipeline schemas with Iceberg-representable integer widths.
MASKS_ARROW = _int16_to_int32(MASKS_SCHEMA)
ERRORS_ARROW = _int16_to_int32(ERRORS_SCHEMA)

# Column metrics (see module docstring): exact bounds on the upsert key, counts on payloads.
_TABLE_PROPERTIES = {
    "format-version": "2",
    "write.parquet.compression-codec": "zstd",
    "write.parquet.compression-level": "3",
    "write.metadata.metrics.column.key": "full",
    "u2net.table-version": "1",
}
_PAYLOAD_COLUMNS = {MASKS_TABLE: ("prob_map", "mask_png", "mask_rle", "source_uri", "content_sha256"),
                    ERRORS_TABLE: ("error_message", "source_uri")}


def masks_iceberg_schema():
    from pyiceberg.schema import Schema
    from pyiceberg.types import (BinaryType, FloatType, IntegerType, NestedField, StringType,
                                 StructType, TimestamptzType)

    bbox = StructType(NestedField(18, "x0", IntegerType()), NestedField(19, "y0", IntegerType()),
                      NestedField(20, "x1", IntegerType()), NestedField(21, "y1", IntegerType()))
    return Schema(
        NestedField(1, "key", StringType(), required=True),
        NestedField(2, "source_uri", StringType()),
        NestedField(3, "source_fingerprint", StringType()),
        NestedField(4, "content_sha256", StringType()),
        NestedField(5, "width", IntegerType()),
        NestedField(6, "height", IntegerType()),
        NestedField(7, "prob_map", BinaryType()),
        NestedField(8, "map_height", IntegerType()),  # int16 in the pipeline: Iceberg has no int16
        NestedField(9, "map_width", IntegerType()),
        NestedField(10, "mask_png", BinaryType()),
        NestedField(11, "mask_rle", StringType()),
        NestedField(12, "coverage", FloatType()),
        NestedField(13, "bbox", bbox),
        NestedField(14, "model", StringType()),
        NestedField(15, "model_id", StringType()),
        NestedField(16, "run_id", StringType()),
        NestedField(17, "processed_at", TimestamptzType()),
        identifier_field_ids=[1],
    )


def errors_iceberg_schema():
    from pyiceberg.schema import Schema
    from pyiceberg.types import NestedField, StringType, TimestamptzType

    return Schema(
        NestedField(1, "key", StringType(), required=True),
        NestedField(2, "source_uri", StringType()),
        NestedField(3, "source_fingerprint", StringType()),
        NestedField(4, "stage", StringType()),
        NestedField(5, "error_type", StringType()),
        NestedField(6, "error_message", StringType()),
        NestedField(7, "model_id", StringType()),
        NestedField(8, "run_id", StringType()),
        NestedField(9, "processed_at", TimestamptzType()),
        identifier_field_ids=[1],
    )


# ---------------------------------------------------------------------------------------------
# Catalog

@dataclass
class CatalogSettings:
    """Where the tables live. `properties` are extra pyiceberg catalog properties
    (`--catalog-property k=v`) and win over the ones derived here."""

    warehouse: str
    uri: Optional[str] = None
    name: str = "u2net"
    namespace: str = "u2net"
    properties: dict = field(default_factory=dict)
    # Captured on the driver; never logged (credentials).
    storage_options: dict = field(default_factory=storage.s3_options, repr=False)

    def table_id(self, table: str) -> str:
        return f"{self.namespace}.{table}"

    def catalog_properties(self) -> dict[str, str]:
        """Properties for `pyiceberg.catalog.load_catalog` (without the name)."""
        proto, path = storage.split_uri(self.warehouse)
        props: dict[str, str] = {}
        if proto == "file":
            props["warehouse"] = f"file://{path}"
            uri = self.uri or f"sqlite:///{os.path.join(path, 'catalog.db')}"
        else:
            props["warehouse"] = storage.to_uri("s3" if proto == "s3a" else proto, path)
            uri = self.uri
            if not uri and "uri" not in self.properties and "type" not in self.properties:
                raise CatalogError(
                    f"--catalog-uri is required for the remote warehouse {self.warehouse!r}: a "
                    "SQLite catalog cannot live in object storage. Use e.g. "
                    "sqlite:////var/lib/u2net/catalog.db, postgresql+psycopg2://..., a REST "
                    "catalog URL, or --catalog-property type=glue")
            if proto in ("s3", "s3a"):
                props.update(_s3_fileio_properties(self.storage_options))
        if uri:
            props["uri"] = uri
        props.update({k: str(v) for k, v in self.properties.items()})
        return props

    def catalog_kwargs(self) -> dict[str, str]:
        """The same, in the form Ray's `write_iceberg(catalog_kwargs=...)` takes."""
        return {"name": self.name, **self.catalog_properties()}

    def load(self):
        from pyiceberg.catalog import load_catalog

        props = self.catalog_properties()
        uri = props.get("uri", "")
        if uri.startswith("sqlite:///"):
            # SQLite creates the file but not its folder.
            os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
        try:
            return load_catalog(self.name, **props)
        except Exception as exc:  # bad properties, missing driver, unreachable database/server
            raise CatalogError(f"cannot load catalog {self.name!r}: {exc}") from None


def _s3_fileio_properties(options: dict) -> dict[str, str]:
    """pyiceberg FileIO properties from `storage.s3_options()` (the driver's AWS environment).

    The region is always set: without it pyiceberg asks AWS where the bucket lives, which
    fails against any other S3 endpoint and off-line."""
    props = {"s3.region": (options.get("client_kwargs") or {}).get("region_name") or "us-east-1"}
    if options.get("endpoint_url"):
        props["s3.endpoint"] = options["endpoint_url"]
    if options.get("key"):
        props["s3.access-key-id"] = options["key"]
        props["s3.secret-access-key"] = options.get("secret") or ""
        if options.get("token"):
            props["s3.session-token"] = options["token"]
    return props


@dataclass
class MaskTables:
    settings: CatalogSettings
    catalog: Any
    masks: Any  # pyiceberg Table
    errors: Any

    def refresh(self) -> None:
        self.masks.refresh()
        self.errors.refresh()


def open_tables(settings: CatalogSettings) -> MaskTables:
    """Load the catalog and create the namespace and both tables on first use."""
    catalog = settings.load()
    try:
        catalog.create_namespace_if_not_exists(settings.namespace)
        tables = []
        for name, schema in ((MASKS_TABLE, masks_iceberg_schema()),
                             (ERRORS_TABLE, errors_iceberg_schema())):
            props = dict(_TABLE_PROPERTIES)
            props.update({f"write.metadata.metrics.column.{c}": "counts" for c in _PAYLOAD_COLUMNS[name]})
            table = catalog.create_table_if_not_exists(settings.table_id(name), schema=schema,
                                                       properties=props)
            if table.current_snapshot() is None:
                # Ray 2.60's UPSERT scans branch `main`, which a new table does not have yet
                # ("Cannot scan unknown ref=main"): start history with an empty snapshot.
                table.append(MASKS_ARROW.empty_table() if name == MASKS_TABLE
                             else ERRORS_ARROW.empty_table(),
                             snapshot_properties={"u2net.operation": "create"})
            tables.append(table)
    except OSError as exc:
        raise CatalogError(f"cannot create the tables in {settings.warehouse!r}: {exc}") from None
    return MaskTables(settings, catalog, *tables)


def load_tables(settings: CatalogSettings) -> MaskTables:
    """Both tables, which must exist (`open_tables` creates them)."""
    catalog = settings.load()
    return MaskTables(settings, catalog, catalog.load_table(settings.table_id(MASKS_TABLE)),
                      catalog.load_table(settings.table_id(ERRORS_TABLE)))


# ---------------------------------------------------------------------------------------------
# Reads and deletes (driver side)

def read_columns(table, columns: Iterable[str]) -> pa.Table:
    """The current snapshot's rows, only `columns` (Parquet projection: no maps are read)."""
    columns = tuple(columns)
    return table.scan(selected_fields=columns).to_arrow().select(list(columns))


def snapshot_ids(table) -> list[int]:
    return [s.snapshot_id for s in table.snapshots()]


def delete_keys(table, keys: pa.Array, properties: dict[str, str]) -> list[int]:
    """Delete the rows of `keys` in one commit; returns the new snapshot ids (none if no row
    matched). pyiceberg rewrites the affected files (copy-on-write): no delete files."""
    from pyiceberg.expressions import In

    if not len(keys):
        return []
    table.refresh()
    before = set(snapshot_ids(table))
    with warnings.catch_warnings():
        # "Delete operation did not match any records": a key list may hold keys already gone.
        warnings.filterwarnings("ignore", message="Delete operation did not match")
        table.delete(In("key", pc.unique(keys).to_pylist()), snapshot_properties=properties)
    table.refresh()
    return [s for s in snapshot_ids(table) if s not in before]


def current_data_files(table) -> list[str]:
    """Data files of the current snapshot, for readers that do not speak Iceberg (DuckDB, Spark
    `read.parquet`). Our commits never write delete files (Ray's upsert and pyiceberg's delete are
    both copy-on-write); this refuses to hand out a file list that would need them."""
    tasks = list(table.scan().plan_files())
    if any(task.delete_files for task in tasks):
        raise ValueError(f"{table.name()} has delete files: read it through an Iceberg reader")
    return [task.file.file_path for task in tasks]


# ---------------------------------------------------------------------------------------------
# Chunk commits

@dataclass
class ChunkOutcome:
    """What one chunk did, for the run summary."""

    ok_keys: pa.Array
    failed_keys: pa.Array
    skipped: int = 0
    vanished: int = 0
    snapshots: dict = field(default_factory=lambda: {MASKS_TABLE: [], ERRORS_TABLE: []})

    @property
    def ok(self) -> int:
        return len(self.ok_keys)

    @property
    def failed(self) -> int:
        return len(self.failed_keys)


@dataclass
class _TaskResult:
    masks: Any  # IcebergWriteResult or None
    errors: Any
    ok_keys: pa.Array
    failed_keys: pa.Array
    skipped_keys: pa.Array
    failed_sources: pa.Array  # source_uri of the failed rows (a unit's own URI: it broke)


def _make_iceberg_sink(settings: CatalogSettings, table: str, properties: dict[str, str]):
    # Ray's own Iceberg writer (what `Dataset.write_iceberg` builds), used for its distributed
    # data-file writes and its copy-on-write UPSERT commit on `key`.
    from ray.data import SaveMode
    from ray.data._internal.datasource.iceberg_datasink import IcebergDatasink

    return IcebergDatasink(settings.table_id(table), catalog_kwargs=settings.catalog_kwargs(),
                           snapshot_properties=properties, mode=SaveMode.UPSERT,
                           upsert_kwargs={"join_cols": ["key"]})


class ChunkSink(Datasink):
    """Ray Data datasink for one chunk: one pass over the pipeline output, both tables.

    Why not `materialize()` and two `write_iceberg` calls: that holds the whole chunk's output
    (maps, PNGs) in the object store, runs two more Ray Data jobs per chunk, and cannot remove
    a key from `masks` in the same commit that upserts the chunk. Here every write task splits
    its rows by status and writes Parquet data files for each table with Ray's
    `IcebergDatasink.write`; the driver then commits what the tasks wrote.

    `known_masks` / `known_errors`: the keys each table holds (planning state plus what this
    run committed since), so that a removal commit happens only when there is a row to remove.
    `previous` (unit_uri, key, same_bytes): what the tables held for this chunk's units before
    the run (unit sources: shards, Parquet files). A unit that is read again is the truth for
    its keys: those it no longer yields are removed from both tables in the chunk's commits.
    Except when reading the unit broke part-way (it has a unit-level error row, and the next
    run reads it again): then rows made from the same bytes stay, as the keys past the break
    may well still be there; rows of older bytes go, as they describe bytes that are gone.
    """

    def __init__(self, settings: CatalogSettings, *, model: str, model_id: str, run_id: str,
                 chunk: int, known_masks: pa.Array, known_errors: pa.Array,
                 previous: Optional[pa.Table] = None, rows_per_file: int = 2000) -> None:
        self.settings = settings
        self.model, self.model_id, self.run_id = model, model_id, run_id
        self.properties = {"u2net.run-id": run_id, "u2net.chunk": str(chunk),
                           "u2net.model-id": model_id}
        self.masks_sink = _make_iceberg_sink(settings, MASKS_TABLE, self.properties)
        self.errors_sink = _make_iceberg_sink(settings, ERRORS_TABLE, self.properties)
        self.known_masks, self.known_errors = known_masks, known_errors
        self.previous = previous if previous is not None else pa.table(
            {"unit_uri": pa.array([], pa.string()), "key": pa.array([], pa.string()),
             "same_bytes": pa.array([], pa.bool_())})
        self.rows_per_file = rows_per_file
        self.now = datetime.now(timezone.utc)  # one processed_at for the whole chunk
        self.outcome: Optional[ChunkOutcome] = None

    def __getstate__(self) -> dict:
        # Write tasks get a pickled copy of the sink; the key sets (up to one per stored row)
        # are only used by the driver's commit, so they do not travel.
        state = self.__dict__.copy()
        for name in ("known_masks", "known_errors", "previous", "outcome"):
            state[name] = None
        return state

    def get_name(self) -> str:
        return "MaskIcebergTables"

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file  # data files of a sensible size, not one per model batch

    def on_write_start(self, schema: Optional[pa.Schema] = None) -> None:
        # The table schemas are ours and fixed: no schema evolution from the incoming rows.
        self.masks_sink.on_write_start(None)
        self.errors_sink.on_write_start(None)

    def write(self, blocks, ctx) -> _TaskResult:
        """Runs in a Ray task: split the rows by status and write each table's data files."""
        from ray.data.block import BlockAccessor

        from pipeline.sinks import error_rows, masks_rows

        parts = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        parts = [p for p in parts if p.num_rows]
        empty = pa.array([], pa.string())
        if not parts:
            return _TaskResult(None, None, empty, empty, empty, empty)
        rows = pa.concat_tables(parts, promote_options="permissive")
        status = rows.column("status")
        ok = rows.filter(pc.equal(status, STATUS_OK))
        bad = rows.filter(pc.equal(status, STATUS_ERROR))
        skipped = rows.filter(pc.equal(status, STATUS_SKIP)).column("key")
        masks = masks_rows(ok, self.model, self.model_id, self.run_id, self.now).cast(MASKS_ARROW)
        errors = error_rows(bad, self.model_id, self.run_id, self.now).cast(ERRORS_ARROW)
        return _TaskResult(
            masks=self.masks_sink.write([masks], ctx) if masks.num_rows else None,
            errors=self.errors_sink.write([errors], ctx) if errors.num_rows else None,
            ok_keys=masks.column("key").combine_chunks(),
            failed_keys=errors.column("key").combine_chunks(),
            skipped_keys=skipped.combine_chunks().cast(pa.string()),
            failed_sources=errors.column("source_uri").combine_chunks())

    def on_write_complete(self, write_result) -> None:
        """Commit the chunk, in this order (each step is one atomic Iceberg commit):

        1. `mask_errors`: upsert the keys that failed (add-only: nothing is removed yet).
        2. `masks`: upsert the keys that succeeded and, in the same commit, remove the keys
           that failed and the keys their unit no longer yields.
        3. `mask_errors`: remove the keys that succeeded or vanished.

        pyiceberg cannot commit two tables in one transaction, so a crash can fall between two
        steps; each step leaves a state the next run's planning sends back through the
        pipeline. After 1 a failed key is in `mask_errors` (retried; files: also stale in
        `masks`). After 2 a succeeded key may still have its old error row, and "a key in
        `mask_errors` is retried" applies. Removals come last so that no key is ever in
        neither table: for shard and Parquet sources a key missing from both tables would be
        invisible to planning, whose listing knows units, not keys.
        """
        results = [r for r in write_result.write_returns if r is not None]
        ok = _concat_keys(r.ok_keys for r in results)
        failed = _concat_keys(r.failed_keys for r in results)
        skipped = _concat_keys(r.skipped_keys for r in results)
        seen = _concat_keys([ok, failed, skipped])
        broken_units = _concat_keys(r.failed_sources for r in results)
        broken = pc.is_in(self.previous.column("unit_uri"), value_set=broken_units)
        prev = self.previous.filter(pc.invert(pc.and_(broken, self.previous.column("same_bytes"))))
        prev_keys = prev.column("key").combine_chunks()
        vanished = pc.unique(prev_keys.filter(pc.invert(pc.is_in(prev_keys, value_set=seen))))
        out = ChunkOutcome(ok_keys=ok, failed_keys=failed, skipped=len(skipped), vanished=len(vanished))

        tables = load_tables(self.settings)
        # 1. errors: add the failures
        err_files = [f for r in results if r.errors is not None for f in r.errors.data_files]
        if err_files:
            out.snapshots[ERRORS_TABLE] += self._commit_upsert(
                self.errors_sink, tables.errors, err_files, failed, ERRORS_ARROW)
        # 2. masks: upsert the successes, remove failed and vanished keys, in one commit
        remove = _present(_concat_keys([failed, vanished]), self.known_masks)
        mask_files = [f for r in results if r.masks is not None for f in r.masks.data_files]
        if mask_files:
            out.snapshots[MASKS_TABLE] += self._commit_upsert(
                self.masks_sink, tables.masks, mask_files, _concat_keys([ok, remove]), MASKS_ARROW)
        elif len(remove):
            out.snapshots[MASKS_TABLE] += delete_keys(tables.masks, remove,
                                                      {**self.properties, "u2net.operation": "remove"})
        # 3. errors: remove the keys that now have a mask, and vanished ones
        remove = _present(_concat_keys([ok, vanished]), self.known_errors)
        if len(remove):
            out.snapshots[ERRORS_TABLE] += delete_keys(tables.errors, remove,
                                                       {**self.properties, "u2net.operation": "remove"})
        self.outcome = out

    @staticmethod
    def _commit_upsert(sink, table, data_files: list, keys: pa.Array, schema: pa.Schema) -> list[int]:
        """Ray's UPSERT commit of files the tasks wrote, with `keys` as the upsert key set:
        every current row with one of these keys is replaced by the new files' rows, or
        removed when the new files have none (that is how one commit both upserts and
        removes)."""
        from ray.data._internal.datasource.iceberg_datasink import IcebergWriteResult
        from ray.data.datasource.datasink import WriteResult

        table.refresh()
        before = set(snapshot_ids(table))
        result = IcebergWriteResult(data_files=data_files,
                                    upsert_keys=pa.table({"key": pc.unique(keys)}),
                                    schemas=[schema])
        sink.on_write_complete(WriteResult(num_rows=sum(f.record_count for f in data_files),
                                           size_bytes=sum(f.file_size_in_bytes for f in data_files),
                                           write_returns=[result]))
        table.refresh()
        return [s for s in snapshot_ids(table) if s not in before]


def _concat_keys(arrays) -> pa.Array:
    arrays = [a for a in arrays if a is not None and len(a)]
    if not arrays:
        return pa.array([], pa.string())
    return pa.concat_arrays([a.cast(pa.string()) for a in arrays])


def _present(keys: pa.Array, known: pa.Array) -> pa.Array:
    """`keys` that are in `known` (vectorised)."""
    if not len(keys) or not len(known):
        return pa.array([], pa.string())
    return pc.unique(keys.filter(pc.is_in(keys, value_set=known)))
