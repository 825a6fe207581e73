"""The nightly incremental job into Iceberg tables, on a real local Ray.

The planner is checked on its own (pure Arrow, no Ray); the job end to end through the same
entry point users run: loose files through a night of changes, WebDataset units, a run killed
with SIGKILL after its first commit, and an S3 warehouse on a real S3 HTTP server.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipeline.incremental import StoredRows, iter_chunks, plan_work, unit_of
from pipeline.sources import UNIT_SCHEMA, Plan
from u2net_core import build_model, save_weights

SIZE = 64  # small model input: the logic is the same at 320, the CPU time is not
ROOT = Path(__file__).parents[1]


# ---------------------------------------------------------------------------------------------
# helpers

@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    """Two different sets of U²-Net† weights (so two model_ids)."""
    out = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path_factory.mktemp("w") / f"u2netp-{seed}.pth"
        save_weights(build_model("u2netp"), path)
        out[f"seed{seed}"] = str(path)
    return out


def _png(seed: int, size=(40, 50)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[0], size[1], 3)) * 255).astype(np.uint8)
    arr[10:30, 15:35] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write(folder: Path, rel: str, data: bytes) -> None:
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    (folder / rel).write_bytes(data)
    # Fingerprints of local files are size + mtime: make a rewrite visible even within the
    # filesystem's timestamp granularity.
    st = (folder / rel).stat()
    os.utime(folder / rel, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _reprocess(input_uri, warehouse, weights_path, *extra, tmp: Path) -> dict:
    from jobs import reprocess

    summary = tmp / f"summary-{time.monotonic_ns()}.json"
    rc = reprocess.main(["--input", str(input_uri), "--warehouse", str(warehouse), "--model", "u2netp",
                         "--weights", weights_path, "--input-size", str(SIZE), "--summary", str(summary),
                         *extra])
    assert rc == 0
    return json.loads(summary.read_text())


def _tables(warehouse, **kw):
    from pipeline.iceberg import CatalogSettings, load_tables

    return load_tables(CatalogSettings(warehouse=str(warehouse), **kw))


def _rows(table, *columns) -> dict[str, dict]:
    from pipeline.iceberg import read_columns

    rows = read_columns(table, ("key", *columns)).to_pylist()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), f"duplicate keys in {table.name()}"
    return {r["key"]: r for r in rows}


def _duckdb_keys(table) -> list[str]:
    """A second reader: DuckDB over the Parquet data files of the current snapshot."""
    import duckdb

    from pipeline.iceberg import current_data_files

    files = [f.removeprefix("file://") for f in current_data_files(table)]
    if not files:
        return []
    listing = ", ".join(f"'{f}'" for f in files)
    return sorted(k for (k,) in duckdb.sql(f"select key from read_parquet([{listing}])").fetchall())


def _check_exactly_once(tables, expected_masks: set[str], expected_errors: set[str]) -> None:
    tables.refresh()
    masks, errors = _rows(tables.masks), _rows(tables.errors)
    assert set(masks) == expected_masks
    assert set(errors) == expected_errors
    assert _duckdb_keys(tables.masks) == sorted(expected_masks)
    assert _duckdb_keys(tables.errors) == sorted(expected_errors)


# ---------------------------------------------------------------------------------------------
# the planner on its own (no Ray, no Iceberg)

def _units(kind: str, rows: list[tuple[str, str | None, str]]) -> Plan:
    table = pa.table({"unit_uri": [r[0] for r in rows], "unit_kind": [kind] * len(rows),
                      "key": [r[1] for r in rows], "fingerprint": [r[2] for r in rows],
                      "size": [1000] * len(rows), "root": ["/in"] * len(rows)}, schema=UNIT_SCHEMA)
    return Plan(kind, "/in", table, len(rows))


def _stored(masks: list[tuple], errors: list[tuple]) -> StoredRows:
    return StoredRows(
        pa.table({"key": [m[0] for m in masks], "source_uri": [m[1] for m in masks],
                  "source_fingerprint": [m[2] for m in masks], "model_id": [m[3] for m in masks]},
                 schema=pa.schema([(c, pa.string()) for c in ("key", "source_uri", "source_fingerprint", "model_id")])),
        pa.table({"key": [e[0] for e in errors], "source_uri": [e[1] for e in errors],
                  "source_fingerprint": [e[2] for e in errors]},
                 schema=pa.schema([(c, pa.string()) for c in ("key", "source_uri", "source_fingerprint")])))


def test_plan_files_reasons_and_prune():
    listing = _units("files", [(f"/in/{k}", k, fp) for k, fp in
                               [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4"), ("e", "5"), ("f", "6")]])
    stored = _stored(
        masks=[("a", "/in/a", "1", "M"),  # unchanged
               ("b", "/in/b", "old", "M"),  # changed bytes
               ("d", "/in/d", "4", "OLD"),  # other model
               ("e", "/in/e", "5", "M"),  # in both tables (a crash between two commits): retried
               ("gone", "/in/gone", "9", "M")],
        errors=[("c", "/in/c", "3"), ("e", "/in/e", "5"), ("gone2", "/in/gone2", "9")])
    plan = plan_work(listing, stored, "M", prune=True)
    reasons = dict(zip(plan.work.column("key").to_pylist(), plan.work.column("reason").to_pylist()))
    assert reasons == {"b": "changed", "c": "retry", "d": "stale", "e": "retry", "f": "new"}
    assert plan.unchanged == 1 and plan.reasons["unchanged"] == 1 and plan.listed_units == 6
    assert plan.prune_masks.to_pylist() == ["gone"] and plan.prune_errors.to_pylist() == ["gone2"]
    assert plan_work(listing, stored, "M").prune_masks.to_pylist() == []  # prune only when asked
    assert plan_work(listing, stored, "M", full=True).work.num_rows == 6
    assert plan_work(listing, stored, "NEW").work.num_rows == 6  # a new model_id: everything
    # chunks: consecutive, in key order, chunk_size keys each
    chunks = [c.units.column("key").to_pylist() for c in iter_chunks(plan, 2)]
    assert chunks == [["b", "c"], ["d", "e"], ["f"]]


def test_plan_units_by_shard():
    shard = lambda name: f"s3://b/in/{name}"  # noqa: E731
    listing = _units("webdataset", [(shard("a.tar"), None, "fa"), (shard("b.tar"), None, "fb"),
                                    (shard("c.tar"), None, "fc2"), (shard("d.tar"), None, "fd"),
                                    (shard("e#1.tar"), None, "fe"), (shard("new.tar"), None, "fn")])
    stored = _stored(
        masks=[("a/1", shard("a.tar") + "#1.jpg", "fa", "M"), ("a/2", shard("a.tar") + "#2.jpg", "fa", "M"),
               ("b/1", shard("b.tar") + "#1.jpg", "fb", "M"), ("b/2", shard("b.tar") + "#2.jpg", "fb", "M"),
               ("c/1", shard("c.tar") + "#1.jpg", "fc1", "M"),
               ("d/1", shard("d.tar") + "#1.jpg", "fd", "OLD"),
               ("e/1", shard("e#1.tar") + "#x.jpg", "fe", "M"),  # a '#' in the shard's own name
               ("z/1", shard("z.tar") + "#1.jpg", "fz", "M")],  # the shard is gone
        errors=[("b/3", shard("b.tar") + "#3.jpg", "fb"),
                ("z.tar", shard("z.tar"), "fz")])  # a unit-level read error of the gone shard
    plan = plan_work(listing, stored, "M", prune=True)
    reasons = dict(zip(plan.work.column("unit_uri").to_pylist(), plan.work.column("reason").to_pylist()))
    assert reasons == {shard("b.tar"): "retry", shard("c.tar"): "changed", shard("d.tar"): "stale",
                       shard("new.tar"): "new"}
    assert plan.unchanged == 3  # a/1, a/2, e/1: stored keys of the units not read
    assert sorted(plan.skip.column("key").to_pylist()) == ["b/1", "b/2"]  # current masks in a retried shard
    previous = {r["key"]: r["same_bytes"] for r in plan.previous.to_pylist()}
    assert previous == {"b/1": True, "b/2": True, "b/3": True, "c/1": False, "d/1": True}
    assert plan.prune_masks.to_pylist() == ["z/1"] and plan.prune_errors.to_pylist() == ["z.tar"]
    # a chunk never splits a unit, and carries its skip keys and stored keys
    chunks = list(iter_chunks(plan, 3))
    assert sum(c.units.num_rows for c in chunks) == 4
    first = chunks[0]
    assert first.units.column("unit_uri").to_pylist()[0] == shard("b.tar")
    assert sorted(first.skip_keys.to_pylist()) == ["b/1", "b/2"]
    assert sorted(first.previous.column("key").to_pylist()) == ["b/1", "b/2", "b/3"]


def test_unit_of_prefers_exact_units_with_hash_in_name():
    got = unit_of(pa.array(["/x/a.tar#k.jpg", "/x/b#c.tar#k.jpg", "/x/b#c.tar", "/x/b.tar#c"]),
                  pa.array(["/x/a.tar", "/x/b#c.tar", "/x/b.tar"]))
    assert got.to_pylist() == ["/x/a.tar", "/x/b#c.tar", "/x/b#c.tar", "/x/b.tar"]


def test_iceberg_schema_matches_the_pipeline_tables():
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    from pipeline import iceberg
    from pipeline.schema import ERRORS_SCHEMA, MASKS_SCHEMA

    for ice, arrow in ((iceberg.masks_iceberg_schema(), MASKS_SCHEMA),
                       (iceberg.errors_iceberg_schema(), ERRORS_SCHEMA)):
        got = schema_to_pyarrow(ice)
        assert got.names == arrow.names
        for f in arrow:
            want = pa.int32() if f.type == pa.int16() else f.type  # Iceberg has no int16
            have = got.field(f.name).type
            if pa.types.is_large_string(have):
                have = pa.string()
            if pa.types.is_large_binary(have):
                have = pa.binary()
            assert have.equals(want) or (pa.types.is_struct(want) and have.num_fields == want.num_fields), f.name
        assert ice.identifier_field_names() == {"key"}


# ---------------------------------------------------------------------------------------------
# the job end to end

def test_nightly_lifecycle_of_loose_files(ray_local, tmp_path, weights):
    """First run, a no-change rerun, a night of changes with --prune, a retry that succeeds,
    and new weights: every key ends in exactly one table each time."""
    inp, wh = tmp_path / "in", tmp_path / "wh"
    for i in range(6):
        _write(inp, f"d{i % 2}/img{i}.png", _png(i))
    names = {f"d{i % 2}/img{i}.png" for i in range(6)}

    s1 = _reprocess(inp, wh, weights["seed0"], "--chunk-size", "4", tmp=tmp_path)
    assert (s1["listed"], s1["processed"], s1["errors"], s1["unchanged"]) == (6, 6, 0, 0)
    assert s1["chunks_committed"] == 2 and len(s1["snapshot_ids"]["masks"]) == 2
    tables = _tables(wh)
    _check_exactly_once(tables, names, set())
    rows = _rows(tables.masks, "prob_map", "map_height", "model_id", "run_id", "source_fingerprint")
    assert all(len(r["prob_map"]) == SIZE * SIZE and r["map_height"] == SIZE for r in rows.values())
    assert {r["model_id"] for r in rows.values()} == {s1["model_id"]}
    history = len(tables.masks.snapshots())

    s2 = _reprocess(inp, wh, weights["seed0"], tmp=tmp_path)
    assert (s2["processed"], s2["unchanged"], s2["chunks_committed"]) == (0, 6, 0)
    assert s2["snapshot_ids"] == {"masks": [], "mask_errors": []}
    tables.refresh()
    assert len(tables.masks.snapshots()) == history  # nothing committed

    # A night of changes: one new, one changed, one deleted, one good image now corrupt.
    _write(inp, "d0/new.png", _png(100))
    _write(inp, "d1/img1.png", _png(101, size=(44, 52)))
    (inp / "d0/img2.png").unlink()
    _write(inp, "d1/img3.png", b"\x89PNG\r\n\x1a\n but not really")
    s3 = _reprocess(inp, wh, weights["seed0"], "--prune", tmp=tmp_path)
    assert (s3["processed"], s3["errors"], s3["pruned"], s3["unchanged"]) == (3, 1, 1, 3)
    assert s3["reasons"]["new"] == 1 and s3["reasons"]["changed"] == 2
    current = (names - {"d0/img2.png", "d1/img3.png"}) | {"d0/new.png"}
    _check_exactly_once(tables, current, {"d1/img3.png"})  # the corrupt image left `masks`
    rows = _rows(tables.masks, "width", "height", "run_id")
    assert (rows["d1/img1.png"]["width"], rows["d1/img1.png"]["height"]) == (52, 44)
    assert rows["d1/img1.png"]["run_id"] == s3["run_id"] and rows["d0/img0.png"]["run_id"] == s1["run_id"]
    err = _rows(tables.errors, "stage", "error_type", "model_id")["d1/img3.png"]
    assert err["stage"] == "decode" and err["model_id"] == s3["model_id"]

    # The broken image is fixed, and new weights arrive: the failed key (changed bytes) is
    # processed again and moves to `masks`, every other row is stale under the new model_id.
    _write(inp, "d1/img3.png", _png(3))
    s4 = _reprocess(inp, wh, weights["seed1"], tmp=tmp_path)
    assert s4["model_id"] != s1["model_id"]
    assert (s4["processed"], s4["errors"], s4["unchanged"]) == (6, 0, 0)
    assert (s4["reasons"]["changed"], s4["reasons"]["stale"]) == (1, 5)
    _check_exactly_once(tables, current | {"d1/img3.png"}, set())
    rows = _rows(tables.masks, "model_id")
    assert {r["model_id"] for r in rows.values()} == {s4["model_id"]}
    # Ray's writer would evolve a table schema that differs from what it writes: ours never do.
    assert tables.masks.metadata.current_schema_id == tables.errors.metadata.current_schema_id == 0


def _shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_webdataset_units_retry_rewrite_and_prune(ray_local, tmp_path, weights):
    inp, wh = tmp_path / "in", tmp_path / "wh"
    _shard(inp / "a.tar", [("1.png", _png(1)), ("2.png", _png(2)), ("3.png", _png(3))])
    _shard(inp / "b.tar", [("1.png", _png(4)), ("2.png", _png(5)), ("3.png", b"not a png")])
    s1 = _reprocess(inp, wh, weights["seed0"], tmp=tmp_path)
    assert (s1["source_kind"], s1["processed"], s1["errors"], s1["listed_units"]) == ("webdataset", 6, 1, 2)
    tables = _tables(wh)
    _check_exactly_once(tables, {"a.tar/1", "a.tar/2", "a.tar/3", "b.tar/1", "b.tar/2"}, {"b.tar/3"})

    # Shard b has a failed sample: it is read again, its two current masks are not decoded again.
    s2 = _reprocess(inp, wh, weights["seed0"], tmp=tmp_path)
    assert (s2["processed"], s2["errors"], s2["unchanged"], s2["listed"]) == (1, 1, 5, 6)
    assert s2["reasons"]["retry"] == 1 and s2["snapshot_ids"]["masks"] == []

    # Shard a is gone; b is rewritten without sample 2 and with sample 3 fixed; c is new and
    # breaks after its first sample.
    (inp / "a.tar").unlink()
    _shard(inp / "b.tar", [("1.png", _png(4)), ("3.png", _png(6))])
    _shard(inp / "c.tar", [("1.png", _png(7)), ("2.png", _png(8))])
    with tarfile.open(inp / "c.tar") as tar:
        second = tar.getmembers()[1]
    (inp / "c.tar").write_bytes((inp / "c.tar").read_bytes()[:second.offset_data + 100])
    s3 = _reprocess(inp, wh, weights["seed0"], "--prune", tmp=tmp_path)
    assert (s3["pruned"], s3["vanished"]) == (3, 1)
    _check_exactly_once(tables, {"b.tar/1", "b.tar/3", "c.tar/1"}, {"c.tar"})
    err = _rows(tables.errors, "stage", "source_uri")["c.tar"]
    assert err["stage"] == "read" and err["source_uri"] == str(inp / "c.tar")
    s4 = _reprocess(inp, wh, weights["seed0"], tmp=tmp_path)  # c is retried: it failed
    assert (s4["processed"], s4["unchanged"], s4["reasons"]["retry"]) == (1, 3, 1)
    _check_exactly_once(tables, {"b.tar/1", "b.tar/3", "c.tar/1"}, {"c.tar"})


class _Crash(BaseException):
    """Stands for the process dying (not an Exception: nothing may catch it)."""


def test_crash_between_the_two_tables_commits_is_repaired(ray_local, tmp_path, weights, monkeypatch):
    """A shard whose failed sample succeeds on retry (same bytes: a limit was raised). The
    run dies right after its first commit (the mask); the next run must still find the key
    and end with it in `masks` only. Committing the removal from `mask_errors` first would
    lose the key: in neither table, inside a shard whose bytes did not change."""
    from pipeline import iceberg

    inp, wh = tmp_path / "in", tmp_path / "wh"
    _shard(inp / "s.tar", [("small.png", _png(1)), ("big.png", _png(2, size=(80, 100)))])
    s1 = _reprocess(inp, wh, weights["seed0"], "--max-pixels", "5000", tmp=tmp_path)
    assert (s1["processed"], s1["errors"]) == (2, 1)
    tables = _tables(wh)
    _check_exactly_once(tables, {"s.tar/small"}, {"s.tar/big"})

    commits = []
    real_upsert, real_delete = iceberg.ChunkSink._commit_upsert, iceberg.delete_keys

    def counted(fn):
        def wrapper(*args, **kwargs):
            ids = fn(*args, **kwargs)
            commits.append(ids)
            if ids:
                raise _Crash()
            return ids
        return wrapper

    monkeypatch.setattr(iceberg.ChunkSink, "_commit_upsert", staticmethod(counted(real_upsert)))
    monkeypatch.setattr(iceberg, "delete_keys", counted(real_delete))
    with pytest.raises(_Crash):
        _reprocess(inp, wh, weights["seed0"], tmp=tmp_path)  # default limit: big.png decodes now
    monkeypatch.undo()
    assert len(commits) == 1
    tables.refresh()
    # Between the two commits a key may be in both tables, never in neither.
    assert set(_rows(tables.masks)) == {"s.tar/small", "s.tar/big"}

    s3 = _reprocess(inp, wh, weights["seed0"], tmp=tmp_path)
    assert (s3["processed"], s3["errors"], s3["reasons"]["retry"]) == (1, 0, 1)
    _check_exactly_once(tables, {"s.tar/small", "s.tar/big"}, set())


def test_killed_run_resumes_from_its_last_commit(ray_local, tmp_path, weights):
    """SIGKILL a run right after its first commit; the rerun ends with every key once."""
    from pipeline.iceberg import CatalogSettings, load_tables

    inp, wh = tmp_path / "in", tmp_path / "wh"
    n = 8
    for i in range(n):
        _write(inp, f"img{i}.png", _png(i))
    cmd = [sys.executable, "-m", "jobs.reprocess", "--input", str(inp), "--warehouse", str(wh),
           "--model", "u2netp", "--weights", weights["seed0"], "--input-size", str(SIZE),
           "--chunk-size", "2", "--num-cpus", "3"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    settings = CatalogSettings(warehouse=str(wh))
    committed = []
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            try:
                masks = load_tables(settings).masks
            except Exception:  # catalog or tables not created yet
                continue
            committed = [s for s in masks.snapshots() if s.summary.get("u2net.run-id")]
            if committed:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert committed, "the run never committed a chunk"
    killed_run = committed[0].summary["u2net.run-id"]
    tables = _tables(wh)
    done = set(_rows(tables.masks))
    assert 2 <= len(done) < n, "the kill must land between two commits"

    s = _reprocess(inp, wh, weights["seed0"], tmp=tmp_path)
    assert s["unchanged"] == len(done) and s["processed"] == n - len(done)
    _check_exactly_once(tables, {f"img{i}.png" for i in range(n)}, set())
    runs = [snap.summary.get("u2net.run-id") for snap in tables.masks.snapshots()]
    assert killed_run in runs and s["run_id"] in runs  # the history shows both runs' commits
    rows = _rows(tables.masks, "run_id")
    assert {r["run_id"] for r in rows.values()} == {killed_run, s["run_id"]}


def test_s3_warehouse_and_input(ray_local, s3_bucket, tmp_path, weights):
    import boto3

    s3 = boto3.client("s3")
    for i in range(3):
        s3.put_object(Bucket=s3_bucket, Key=f"images/img{i}.png", Body=_png(i))
    s3.put_object(Bucket=s3_bucket, Key="images/bad.jpg", Body=b"\xff\xd8garbage")
    wh = f"s3://{s3_bucket}/warehouse"
    catalog = f"sqlite:///{tmp_path / 'catalog.db'}"
    s1 = _reprocess(f"s3://{s3_bucket}/images", wh, weights["seed0"], "--catalog-uri", catalog, tmp=tmp_path)
    assert (s1["processed"], s1["errors"]) == (4, 1)
    tables = _tables(wh, uri=catalog)
    assert set(_rows(tables.masks)) == {"img0.png", "img1.png", "img2.png"}
    assert set(_rows(tables.errors)) == {"bad.jpg"}
    data = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="warehouse/")["Contents"]]
    assert any(k.endswith(".parquet") for k in data) and any(k.endswith(".metadata.json") for k in data)
    # Next night: the failed key is retried as it is (same ETag), one image is gone; ETag
    # fingerprints are stable, so nothing else is processed.
    s3.delete_object(Bucket=s3_bucket, Key="images/img2.png")
    s2 = _reprocess(f"s3://{s3_bucket}/images", wh, weights["seed0"], "--catalog-uri", catalog,
                    "--prune", tmp=tmp_path)
    assert (s2["processed"], s2["errors"], s2["unchanged"], s2["pruned"]) == (1, 1, 2, 1)
    assert s2["reasons"]["retry"] == 1
    tables.refresh()
    assert set(_rows(tables.masks)) == {"img0.png", "img1.png"}
    assert set(_rows(tables.errors)) == {"bad.jpg"}


def test_job_level_errors_are_one_line(tmp_path, weights, capsys):
    from jobs import reprocess

    (tmp_path / "in").mkdir()
    base = ["--input", str(tmp_path / "in"), "--model", "u2netp", "--weights", weights["seed0"]]
    assert reprocess.main([*base, "--warehouse", "s3://bucket/wh"]) == 2
    assert "--catalog-uri is required" in capsys.readouterr().err
    assert reprocess.main([*base, "--warehouse", str(tmp_path / "wh"), "--catalog-property", "novalue"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert reprocess.main([*base, "--warehouse", str(tmp_path / "wh"), "--namespace", "a.b"]) == 2
    assert "--namespace" in capsys.readouterr().err
    # An empty listing is an error, never "everything was deleted" (with --prune it would be).
    assert reprocess.main([*base, "--warehouse", str(tmp_path / "wh"), "--prune"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no inputs found") and err.count("\n") == 1
