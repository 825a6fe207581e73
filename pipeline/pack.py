"""Pack loose images (a prefix, or a manifest) into WebDataset tar or Parquet shards with Ray.

    <output>/shard-000000.tar …     N images each (`shard_size`), or `shard-000000.parquet`
    <output>/_index/<shard>.parquet  per shard: one row per input (packed or not) and why
    <output>/_done/<shard>.json      per shard, written last: size, sha256, what went in
    <output>/_index.parquet          all index rows in one file (merged at the end of a run)
    <output>/_pack.json              the run summary, written last: its presence marks a
                                     finished pack (removed when a rerun starts)

Shard assignment is a pure function of the sorted input listing: unit i goes to shard
i // shard_size, at position i % shard_size. One Ray task per shard fetches its inputs, builds
the shard in memory (a shard is held twice, as inputs and as the shard: pick `shard_size`
accordingly) and writes it with one atomic object write (temp name + rename locally, one PUT
on object stores), so readers never see half a shard. Then the task writes the shard's index
piece and, last, its done marker.

A rerun skips a shard only after checking it: the marker must describe the same inputs (a
digest of the shard's keys, URIs and fingerprints, and the format), the shard must have the
recorded size, and (`verify="sha256"`, the default) the recorded sha256; a shard with read
errors is never done (its reads are retried, as the inference job retries failed keys).
Anything else is repacked, and shards, index pieces and markers of an earlier plan that the current plan does
not have (the listing shrank, the shard size changed) are removed at the end of the run.

WebDataset samples are named by their zero-padded position in the shard (original paths may
hold dots, `..` or absolute parts, none of which belong in a tar member name); the image member
keeps the original extension (sniffed from the bytes when the name has no image extension)
and a `.json` member carries `{"key", "source_uri", "fingerprint"}`: `pipeline.shards.
original_key` gives the inference job the original key back. Parquet shards hold the columns
key, image, source_uri, source_fingerprint. Bad images are packed as they are (decoding is the
inference job's business); inputs that cannot be read are listed in the index with the reason
and not packed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator, Literal, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import shards, storage
from pipeline.config import SourceConfig
from pipeline.manifest import is_manifest_uri, unit_errors
from pipeline.schema import short_message
from pipeline.sources import Plan, plan_source

__all__ = ["PackConfig", "ShardSpec", "plan_pack_input", "plan_shards", "pack_shard", "run_pack",
           "INDEX_SCHEMA", "INDEX_FILE", "SUMMARY_FILE", "shard_name"]

log = logging.getLogger("u2net_ray")

INDEX_FILE, INDEX_DIR, DONE_DIR, SUMMARY_FILE = "_index.parquet", "_index", "_done", "_pack.json"
_SHARD_NAME = re.compile(r"^shard-\d+\.(tar|parquet)$")
_EXTENSIONS = {"webdataset": "tar", "parquet": "parquet"}
# Image bytes are compressed already: recompressing them costs CPU for nothing.
_PARQUET_COMPRESSION = {"key": "zstd", "image": "none", "source_uri": "zstd",
                        "source_fingerprint": "zstd"}
_PARQUET_ROW_GROUP = 256  # rows per row group: readers stream a shard in slices this size

SHARD_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("image", pa.binary()),
    ("source_uri", pa.string()),
    ("source_fingerprint", pa.string()),
])

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),  # shard file name under the output; null when not packed
    ("position", pa.int32()),  # index in the shard: the WebDataset sample name (zero-padded), or the Parquet row
    ("source_uri", pa.string()),
    ("source_fingerprint", pa.string()),
    ("bytes", pa.int64()),  # image bytes; null when not packed
    ("content_sha256", pa.string()),
    ("status", pa.string()),  # ok | error
    ("error_type", pa.string()),
    ("error_message", pa.string()),
])


@dataclass
class PackConfig:
    output: str
    format: Literal["webdataset", "parquet"] = "webdataset"
    shard_size: int = 1000
    verify: Literal["sha256", "size"] = "sha256"
    num_cpus: float = 0.5  # per shard task: mostly waiting on reads and writes
    max_in_flight: Optional[int] = None  # shard tasks submitted at once (default: 2 per CPU slot)
    # The driver's S3 options for the output, captured here and handed to every task.
    storage_options: dict = field(default_factory=storage.s3_options, repr=False)

    def __post_init__(self) -> None:
        if self.format not in _EXTENSIONS:
            raise ValueError(f"unknown shard format {self.format!r}")
        if self.shard_size < 1:
            raise ValueError("shard_size must be >= 1")


@dataclass
class ShardSpec:
    index: int
    name: str  # e.g. shard-000003.tar
    units: pa.Table  # the shard's units (UNIT_SCHEMA, + error columns for manifests)
    sample_width: int  # digits of a sample name
    digest: str  # what the shard is made of; a done marker with another digest is stale

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[0]


def shard_name(index: int, count: int, fmt: str) -> str:
    return f"shard-{index:0{max(6, len(str(max(count - 1, 0))))}d}.{_EXTENSIONS[fmt]}"


def _digest(units: pa.Table, fmt: str, sample_width: int) -> str:
    h = hashlib.sha256(f"{fmt}\0{sample_width}\0".encode())
    errors, _ = unit_errors(units)
    for key, uri, fp, err in zip(units.column("key").to_pylist(), units.column("unit_uri").to_pylist(),
                                 units.column("fingerprint").to_pylist(), errors):
        h.update(f"{key}\0{uri}\0{fp}\0{err or ''}\n".encode())
    return h.hexdigest()


def plan_shards(units: pa.Table, cfg: PackConfig) -> list[ShardSpec]:
    """Sort by key and cut into shards of `shard_size` (deterministic for a given listing)."""
    units = units.sort_by("key")
    n = units.num_rows
    count = (n + cfg.shard_size - 1) // cfg.shard_size
    width = max(6, len(str(cfg.shard_size - 1)))
    specs = []
    for i in range(count):
        # `take` copies the rows: a zero-copy slice would pickle the whole table into every task.
        part = units.take(pa.array(range(i * cfg.shard_size, min(n, (i + 1) * cfg.shard_size))))
        specs.append(ShardSpec(i, shard_name(i, count, cfg.format), part, width,
                               _digest(part, cfg.format, width)))
    return specs


# ---------------------------------------------------------------------------------------------
# One shard (runs in a Ray task)

_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"),
          (b"BM", "bmp"), (b"II*\x00", "tif"), (b"MM\x00*", "tif"))


def _member_ext(key: str, data: bytes) -> str:
    """The image member's extension: the original one when it names an image format."""
    ext = posixpath.basename(key).rsplit(".", 1)[-1].lower() if "." in posixpath.basename(key) else ""
    if ext in shards.IMAGE_EXTS:
        return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, guess in _MAGIC:
        if data.startswith(magic):
            return guess
    # Unknown bytes are still packed as an image member, so that the inference job reports
    # them as undecodable, as it would for the loose object.
    return "jpg"


def _out(cfg: PackConfig, *parts: str) -> str:
    return storage.join_uri(cfg.output, *parts)


def _read_json(uri: str, options: dict) -> Optional[dict]:
    try:
        value = json.loads(storage.read_bytes(uri, options))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _sha256_of(uri: str, options: dict) -> str:
    fs, path = storage.filesystem(uri, options)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verified_marker(spec: ShardSpec, cfg: PackConfig) -> Optional[dict]:
    """The shard's done marker if the shard on storage is exactly what this plan would write."""
    opts = cfg.storage_options
    marker = _read_json(_out(cfg, DONE_DIR, f"{spec.stem}.json"), opts)
    if not marker or marker.get("digest") != spec.digest or marker.get("shard") not in (spec.name, None):
        return None
    if marker.get("read_errors", 0):
        return None  # reads fail for passing reasons too (throttling, timeouts): try them again
    try:
        if not storage.exists(_out(cfg, INDEX_DIR, f"{spec.stem}.parquet"), opts):
            return None
        if marker["shard"] is not None:
            fs, path = storage.filesystem(_out(cfg, spec.name), opts)
            if fs.size(path) != marker["bytes"]:
                return None
            if cfg.verify == "sha256" and _sha256_of(_out(cfg, spec.name), opts) != marker["sha256"]:
                return None
    except (FileNotFoundError, KeyError, TypeError):
        return None
    return marker


def _index_rows(spec: ShardSpec) -> dict[str, list]:
    rows: dict[str, list] = {f.name: [] for f in INDEX_SCHEMA}
    rows["key"] = spec.units.column("key").to_pylist()
    rows["source_uri"] = spec.units.column("unit_uri").to_pylist()
    rows["source_fingerprint"] = spec.units.column("fingerprint").to_pylist()
    for name in ("shard", "position", "bytes", "content_sha256", "status", "error_type", "error_message"):
        rows[name] = [None] * spec.units.num_rows
    return rows


def _build(spec: ShardSpec, fmt: str, datas: list) -> tuple[Optional[bytes], dict[str, list]]:
    """(shard bytes or None when nothing was readable, index rows) from fetched inputs."""
    rows = _index_rows(spec)
    errors, messages = unit_errors(spec.units)
    writer = shards.TarSampleWriter() if fmt == "webdataset" else None
    table_cols: dict[str, list] = {f.name: [] for f in SHARD_SCHEMA}
    for j, data in enumerate(datas):
        key, uri, fp = rows["key"][j], rows["source_uri"][j], rows["source_fingerprint"][j]
        if errors[j] is not None:  # decided at plan time (duplicate key, no URI, ...)
            rows["status"][j], rows["error_type"][j], rows["error_message"][j] = "error", errors[j], messages[j]
            continue
        if isinstance(data, BaseException):
            rows["status"][j], rows["error_type"][j] = "error", type(data).__name__
            rows["error_message"][j] = short_message(data)
            continue
        data = bytes(data)
        rows["status"][j], rows["shard"][j], rows["position"][j] = "ok", spec.name, j
        rows["bytes"][j], rows["content_sha256"][j] = len(data), hashlib.sha256(data).hexdigest()
        if writer is not None:
            meta = json.dumps({"key": key, "source_uri": uri, "fingerprint": fp}, sort_keys=True)
            writer.add(f"{j:0{spec.sample_width}d}", {_member_ext(key, data): data, "json": meta.encode()})
        else:
            for name, value in zip(SHARD_SCHEMA.names, (key, data, uri, fp)):
                table_cols[name].append(value)
    if writer is not None:
        return (writer.finish() if writer.count else None), rows
    if not table_cols["key"]:
        return None, rows
    buf = io.BytesIO()
    pq.write_table(pa.table(table_cols, schema=SHARD_SCHEMA), buf, compression=_PARQUET_COMPRESSION,
                   row_group_size=_PARQUET_ROW_GROUP)
    return buf.getvalue(), rows


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def pack_shard(spec: ShardSpec, cfg: PackConfig, source_options: dict) -> dict:
    """Pack one shard unless a verified copy exists; returns its done marker (+ `skipped`)."""
    t0 = time.perf_counter()
    done = verified_marker(spec, cfg)
    t_verify = time.perf_counter()
    if done is not None:
        return {**done, "skipped": True, "timings": {"verify_s": t_verify - t0}}
    errors, _ = unit_errors(spec.units)
    uris = spec.units.column("unit_uri").to_pylist()
    wanted = [j for j, e in enumerate(errors) if e is None]
    datas: list[Any] = [None] * len(uris)
    for j, got in zip(wanted, storage.read_many([uris[j] for j in wanted], source_options)):
        datas[j] = got
    t_fetch = time.perf_counter()
    blob, rows = _build(spec, cfg.format, datas)
    read_errors = sum(isinstance(d, BaseException) for d in datas)
    del datas
    t_build = time.perf_counter()
    opts = cfg.storage_options
    marker = {"shard": None, "format": cfg.format, "digest": spec.digest, "bytes": 0, "sha256": None,
              "inputs": spec.units.num_rows, "packed": rows["status"].count("ok"),
              "errors": rows["status"].count("error"),
              "read_errors": read_errors,
              "image_bytes": sum(b or 0 for b in rows["bytes"])}
    if blob is not None:
        storage.write_bytes(_out(cfg, spec.name), blob, opts)  # atomic: temp + rename, or one PUT
        marker.update(shard=spec.name, bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    elif storage.exists(_out(cfg, spec.name), opts):
        # Nothing readable this time: a shard left by an earlier plan under this name must go.
        fs, path = storage.filesystem(_out(cfg, spec.name), opts)
        fs.rm_file(path)
    del blob
    storage.write_bytes(_out(cfg, INDEX_DIR, f"{spec.stem}.parquet"),
                        _parquet_bytes(pa.table(rows, schema=INDEX_SCHEMA)), opts)
    marker["written_at"] = datetime.now(timezone.utc).isoformat()
    # Last: a marker only ever describes a shard and an index piece that are complete.
    storage.write_bytes(_out(cfg, DONE_DIR, f"{spec.stem}.json"), json.dumps(marker, indent=1).encode(), opts)
    t_write = time.perf_counter()
    return {**marker, "skipped": False, "timings": {
        "verify_s": t_verify - t0, "fetch_s": t_fetch - t_verify, "build_s": t_build - t_fetch,
        "write_s": t_write - t_build}}


# ---------------------------------------------------------------------------------------------
# The run (driver)

def _run_tasks(specs: list[ShardSpec], cfg: PackConfig, source_options: dict) -> Iterator[dict]:
    """One Ray task per shard, at most `max_in_flight` at a time (the driver never holds more
    than that many shards' unit tables in the object store). Results in completion order."""
    import ray

    task = ray.remote(pack_shard).options(num_cpus=cfg.num_cpus, max_retries=3,
                                          retry_exceptions=[OSError])
    slots = cfg.max_in_flight or max(2, int(2 * float(ray.cluster_resources().get("CPU", 1)) / cfg.num_cpus))
    pending = list(reversed(specs))
    running: list = []
    while pending or running:
        while pending and len(running) < slots:
            running.append(task.remote(pending.pop(), cfg, source_options))
        ready, running = ray.wait(running, num_returns=1)
        yield ray.get(ready[0])


def _remove_stale(cfg: PackConfig, names: set[str]) -> int:
    """Delete shards, index pieces and markers of this output that the current plan lacks."""
    fs, root = storage.filesystem(cfg.output, cfg.storage_options)
    stems = {n.rsplit(".", 1)[0] for n in names}
    stale = []
    for sub, wanted in (("", lambda b: _SHARD_NAME.match(b) and b not in names),
                        (INDEX_DIR, lambda b: b.endswith(".parquet") and b[:-8] not in stems),
                        (DONE_DIR, lambda b: b.endswith(".json") and b[:-5] not in stems)):
        path = posixpath.join(root, sub) if sub else root
        try:
            listed = fs.ls(path, detail=False)
        except FileNotFoundError:
            continue
        stale += [p for p in listed if wanted(posixpath.basename(p.rstrip("/")))]
    for p in stale:
        fs.rm_file(p)
    return len(stale)


def _write_index(cfg: PackConfig, specs: list[ShardSpec]) -> int:
    """Merge the index pieces, in shard order, into one `_index.parquet`, streaming."""
    opts = cfg.storage_options
    pafs, out_path = storage.pyarrow_filesystem(_out(cfg, INDEX_FILE), opts)
    local = storage.is_local(cfg.output)
    target = (posixpath.join(posixpath.dirname(out_path), f".{INDEX_FILE}.tmp-{os.getpid()}")
              if local else out_path)

    def piece(spec: ShardSpec) -> pa.Table:
        return pq.read_table(io.BytesIO(storage.read_bytes(_out(cfg, INDEX_DIR, f"{spec.stem}.parquet"), opts)))

    rows = 0
    # On S3 `open_output_stream` is a multipart upload that appears only when closed.
    with pafs.open_output_stream(target) as sink, \
            pq.ParquetWriter(sink, INDEX_SCHEMA, compression="zstd") as writer, \
            ThreadPoolExecutor(max_workers=16) as pool:
        for i in range(0, len(specs), 64):  # bounded read-ahead: pieces are read 64 at a time
            for table in pool.map(piece, specs[i:i + 64]):
                writer.write_table(table.cast(INDEX_SCHEMA))
                rows += table.num_rows
    if local:
        os.replace(target, out_path)
    return rows


def plan_pack_input(source: SourceConfig) -> Plan:
    """List the loose files, or read the manifest, on the driver (no Ray needed)."""
    if source.kind == "auto":
        source = dataclasses.replace(source, kind="manifest" if is_manifest_uri(source.uri) else "files")
    if source.kind not in ("files", "manifest"):
        raise ValueError(f"pack reads loose files or a manifest, not {source.kind!r} inputs")
    plan = plan_source(source)
    if plan.units.num_rows == 0:
        raise storage.StorageError(f"no inputs found under {source.uri!r} ({plan.listed_files} listed)")
    return plan


def run_pack(source: SourceConfig, cfg: PackConfig, plan: Optional[Plan] = None,
             progress_every: float = 10.0) -> dict:
    """Plan (unless given `plan_pack_input`'s result), pack every shard not already verified,
    clean up, merge the index; the summary is returned and written to `<output>/_pack.json`
    last. Ray must be initialised."""
    t0 = time.perf_counter()
    planned_here = plan is None
    plan = plan or plan_pack_input(source)
    t_plan = time.perf_counter()
    opts = cfg.storage_options
    summary_uri = _out(cfg, SUMMARY_FILE)
    if storage.exists(summary_uri, opts):  # an unfinished rerun must not look finished
        fs, path = storage.filesystem(summary_uri, opts)
        fs.rm_file(path)
    specs = plan_shards(plan.units, cfg)
    t_shards = time.perf_counter()
    log.info("pack: %d inputs (%s) into %d %s shards of %d under %s", plan.units.num_rows, plan.kind,
             len(specs), cfg.format, cfg.shard_size, cfg.output)

    totals = {"inputs": 0, "packed": 0, "errors": 0, "shard_bytes": 0, "image_bytes": 0,
              "shards_written": 0, "shards_skipped": 0, "empty_shards": 0}
    task_time = {"verify_s": 0.0, "fetch_s": 0.0, "build_s": 0.0, "write_s": 0.0}
    last_log = time.perf_counter()
    for done, result in enumerate(_run_tasks(specs, cfg, source.storage_options), 1):
        for k in ("inputs", "packed", "errors", "image_bytes"):
            totals[k] += result[k]
        totals["shard_bytes"] += result["bytes"]
        totals["shards_skipped" if result["skipped"] else "shards_written"] += 1
        totals["empty_shards"] += result["shard"] is None
        for k, v in result["timings"].items():
            task_time[k] += v
        if time.perf_counter() - last_log > progress_every:
            last_log = time.perf_counter()
            log.info("pack: %d/%d shards done", done, len(specs))
    t_pack = time.perf_counter()
    removed = _remove_stale(cfg, {s.name for s in specs})
    index_rows = _write_index(cfg, specs)
    t_end = time.perf_counter()
    summary = {
        "input": source.uri,
        "source_kind": plan.kind,
        "output": cfg.output,
        "format": cfg.format,
        "shard_size": cfg.shard_size,
        "shards": len(specs),
        **totals,
        "stale_removed": removed,
        "index_rows": index_rows,
        "listed": plan.listed_files,
        "settings": {k: v for k, v in asdict(cfg).items() if k != "storage_options"},
        "timings": {
            "plan_s": round(t_plan - t0, 3) if planned_here else None,  # None: planned by the caller
            "shard_plan_s": round(t_shards - t_plan, 3),
            "pack_s": round(t_pack - t_shards, 3),
            "index_s": round(t_end - t_pack, 3),
            "total_s": round(t_end - t0, 3),
            "task_seconds": {k: round(v, 3) for k, v in task_time.items()},
            "images_per_s": round(totals["inputs"] / max(t_pack - t_shards, 1e-9), 1),
        },
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }
    storage.write_bytes(summary_uri, json.dumps(summary, indent=2).encode(), opts)
    return summary
