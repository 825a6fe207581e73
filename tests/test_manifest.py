"""Manifest inputs: planning on the driver (keys, fingerprints, errors as units) and reading
the bytes per batch across filesystems, without listing any bucket."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.config import SourceConfig
from pipeline.manifest import MANIFEST_UNIT_SCHEMA, plan_manifest, read_manifest_units
from pipeline.sources import READ_SCHEMA, UNIT_SCHEMA, _Rows, expand_units, plan_source


def _cfg(uri, **kw) -> SourceConfig:
    return SourceConfig(uri=str(uri), kind="manifest", storage_options=kw.pop("storage_options", {}), **kw)


def _by_key(plan):
    return {r["key"]: r for r in plan.units.to_pylist()}


def test_csv_keys_uris_fingerprints_and_plan_time_errors(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "m.csv").write_text(
        "uri,size,etag\n"
        'img/a.jpg,11,"""e1"""\n'            # relative: resolved against the manifest's folder
        "./img/b.jpg,12,e2\n"
        f"{tmp_path}/img/c.jpg,,\n"           # absolute local path
        f"file://{tmp_path}/img/d.jpg,13,\n"  # file:// URI: read as a plain path
        "s3://bucket/dir/x.jpg,4,y\n"
        "gs://other/dir/x.jpg,5,z\n"          # same key as the row above, other filesystem
        "s3://third/dir/x.jpg,6,w\n"          # third row with that key: still one error
        ",7,q\n"                              # no URI
        "s3://bucket/,1,1\n")                 # no key derivable
    plan = plan_manifest(_cfg(tmp_path / "m.csv"))
    assert plan.kind == "manifest" and plan.keys_known and plan.listed_files == 9
    assert plan.units.schema == MANIFEST_UNIT_SCHEMA
    assert plan.units.column("key").to_pylist() == sorted(plan.units.column("key").to_pylist())
    u = _by_key(plan)
    assert u["img/a.jpg"]["unit_uri"] == f"{tmp_path}/img/a.jpg"
    assert u["img/a.jpg"]["fingerprint"] == "11-e1"  # the listing's <size>-<etag>, quotes stripped
    assert u["img/b.jpg"]["unit_uri"] == f"{tmp_path}/img/b.jpg" and u["img/b.jpg"]["size"] == 12
    c_key = f"{tmp_path}/img/c.jpg".lstrip("/")
    assert u[c_key]["unit_uri"] == f"{tmp_path}/img/c.jpg" and u[c_key]["fingerprint"] == ""
    d_key = f"{tmp_path}/img/d.jpg".lstrip("/")
    assert u[d_key]["unit_uri"] == f"{tmp_path}/img/d.jpg" and u[d_key]["fingerprint"] == "13"
    dup = u["dir/x.jpg"]
    assert dup["error_type"] == "DuplicateKey" and dup["error_message"].startswith("3 inputs share")
    assert "gs://other/dir/x.jpg" in dup["error_message"]
    assert plan.units.column("key").to_pylist().count("dir/x.jpg") == 1
    errors = {r["error_type"]: r for r in plan.units.to_pylist() if r["error_type"]}
    assert errors["MissingURI"]["key"] == f"{tmp_path}/m.csv#row=7"
    assert errors["MissingKey"]["key"] == f"{tmp_path}/m.csv#row=8"
    assert sum(r["error_type"] is None for r in plan.units.to_pylist()) == 4


def test_parquet_prefix_key_column_and_bad_manifests(tmp_path):
    d = tmp_path / "manifests"
    d.mkdir()
    pq.write_table(pa.table({"id": ["k1", "k2", None], "url": ["/x/1.jpg", "/x/2.jpg", "/x/3.jpg"],
                             "fingerprint": ["f1", None, "f3"]}), d / "part-0.parquet")
    pq.write_table(pa.table({"id": ["k2", "k4"], "url": ["/y/2.jpg", "/y/4.jpg"],
                             "fingerprint": ["g2", "g4"]}), d / "part-1.parquet")
    (d / "_SUCCESS").write_text("")
    plan = plan_source(_cfg(d, key_column="id", uri_column="url"))
    u = _by_key(plan)
    assert set(u) == {"k1", "k2", "k4", f"{d}/part-0.parquet#row=2"}
    assert (u["k1"]["unit_uri"], u["k1"]["fingerprint"]) == ("/x/1.jpg", "f1")
    assert u["k2"]["error_type"] == "DuplicateKey"  # duplicates are found across manifest files
    assert u[f"{d}/part-0.parquet#row=2"]["error_type"] == "MissingKey"
    with pytest.raises(storage.StorageError, match="no column 'uri'"):
        plan_manifest(_cfg(d, key_column="id"))
    with pytest.raises(storage.StorageError, match="'nope'"):  # a named key column must exist
        plan_manifest(_cfg(d, key_column="nope", uri_column="url"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(storage.StorageError, match="no manifest files"):
        plan_manifest(_cfg(tmp_path / "empty"))


def test_read_units_across_buckets_and_filesystems(s3_bucket, tmp_path):
    import boto3

    s3 = boto3.client("s3")
    other = s3_bucket[:50] + "-b"
    s3.create_bucket(Bucket=other)
    s3.put_object(Bucket=s3_bucket, Key="a/one.jpg", Body=b"one")
    s3.put_object(Bucket=other, Key="b/two [1].jpg", Body=b"two")  # glob characters in a name
    (tmp_path / "three.jpg").write_bytes(b"three")
    pq.write_table(pa.table({"uri": [f"s3://{s3_bucket}/a/one.jpg", f"s3://{other}/b/two [1].jpg",
                                     str(tmp_path / "three.jpg"), f"s3://{s3_bucket}/a/missing.jpg",
                                     f"s3://{s3_bucket}/a/one.jpg"],
                             "key": ["one", "two", "three", "missing", "one"]}),
                   tmp_path / "m.parquet")
    options = storage.s3_options()  # captured here, as the driver does; passed explicitly
    cfg = _cfg(tmp_path / "m.parquet", storage_options=options)
    plan = plan_manifest(cfg)
    out = expand_units(plan.units, cfg)  # the hook in pipeline.sources dispatches to manifests
    assert out.schema == READ_SCHEMA
    rows = {r["key"]: r for r in out.to_pylist()}
    assert set(rows) == {"one", "two", "three", "missing"}
    assert (rows["two"]["data"], rows["three"]["data"]) == (b"two", b"three")
    assert rows["missing"]["status"] == "error" and rows["missing"]["error_type"] == "FileNotFoundError"
    assert rows["one"]["error_type"] == "DuplicateKey" and rows["one"]["data"] is None
    # plain UNIT_SCHEMA units (no error columns) read the same way
    plain = plan.units.select(UNIT_SCHEMA.names).filter(pa.compute.equal(plan.units.column("key"), "two"))
    got = _Rows()
    read_manifest_units(plain, got, options)
    assert got.table().column("data").to_pylist() == [b"two"]
