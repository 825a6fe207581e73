"""Packing into shards on a real local Ray: keys survive packing (the inference job gives the
same keys on the folder, its shards and a manifest of it), reruns verify and resume, bad and
unreadable inputs, Parquet shards, S3 with options handed to the workers explicitly."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import shards, storage

SIZE = 64


def _image(seed: int, fmt: str = "PNG") -> bytes:
    arr = (np.random.default_rng(seed).random((24 + seed, 30, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


# Awkward but legal names: dots in folders and stems, `..` inside a name, upper-case extension.
# (A name starting with `.` is hidden: not listed, so not an input.)
NAMES = ["a.b/c.d.png", "a.b/e..f.png", "plain/x.png", "UP.JPG", "deep/er/z.webp.png", "n0.png"]


def _write_folder(folder: Path) -> dict[str, bytes]:
    files = {}
    for i, name in enumerate(NAMES):
        files[name] = _image(i, "JPEG" if name.endswith(".JPG") else "PNG")
    files["broken.jpg"] = b"\xff\xd8\xff not really a jpeg"  # packed as is; infer reports it
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def _pack(*args: str) -> int:
    from jobs import pack

    return pack.main(list(args))


def _infer(input_uri: str, output: str, weights: str, *extra: str) -> tuple[dict, dict]:
    from jobs import infer

    assert infer.main(["--input", input_uri, "--output", output, "--model", "u2netp", "--weights",
                       weights, "--input-size", str(SIZE), *extra]) == 0

    def read(name):
        pafs, path = storage.pyarrow_filesystem(storage.join_uri(output, name))
        return pq.read_table(path, filesystem=pafs).column("key").to_pylist()
    masks, errors = read("masks"), read("mask_errors")
    assert len(masks + errors) == len(set(masks + errors))  # every key exactly once
    return set(masks), set(errors)


def _summary(out) -> dict:
    return json.loads(storage.read_bytes(storage.join_uri(str(out), "_pack.json")))


def test_pack_then_infer_keys_match_folder_and_manifest(ray_local, tmp_path, weights):
    files = _write_folder(tmp_path / "in")
    out = tmp_path / "packed"
    assert _pack("--input", str(tmp_path / "in"), "--output", str(out), "--shard-size", "3") == 0
    s = _summary(out)
    assert (s["inputs"], s["packed"], s["errors"], s["shards"]) == (7, 7, 0, 3)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("_")) == \
        ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    # Assignment follows the sorted listing; samples are named by position, keys ride in .json
    seen = []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
        assert all(re.fullmatch(r"\d{6}\.(png|jpg|json)", n) for n in names), names
        with open(shard, "rb") as f:
            for sample, members in shards.iter_samples(f):
                meta = json.loads(members["json"])
                assert meta["source_uri"] == str(tmp_path / "in" / meta["key"]) and meta["fingerprint"]
                assert shards.image_member(members)[1] == files[meta["key"]]  # bytes as they were
                seen.append(meta["key"])
    assert seen == sorted(files)
    index = pq.read_table(out / "_index.parquet")
    assert index.num_rows == 7 and set(index.column("status").to_pylist()) == {"ok"}
    assert index.column("key").to_pylist() == sorted(files)
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp files left

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("key,uri\n" + "".join(f"{k},{tmp_path / 'in' / k}\n" for k in files))
    direct = _infer(str(tmp_path / "in"), str(tmp_path / "o1"), weights)
    packed = _infer(str(out), str(tmp_path / "o2"), weights)
    listed = _infer(str(manifest), str(tmp_path / "o3"), weights, "--source", "manifest")
    assert direct == packed == listed
    masks, errors = direct
    assert masks | errors == set(files) and errors == {"broken.jpg"}


def _shard_mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}


def test_rerun_verifies_repacks_and_removes_stale(ray_local, tmp_path):
    files = {f"img{i}.png": _image(i) for i in range(5)}
    for name, data in files.items():
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(data)
    out = tmp_path / "packed"
    args = ("--input", str(tmp_path / "in"), "--output", str(out), "--shard-size", "2")
    assert _pack(*args) == 0
    first = _shard_mtimes(out)
    assert len(first) == 3 and _summary(out)["shards_written"] == 3

    assert _pack(*args) == 0  # unchanged: every shard verified and skipped
    assert (_summary(out)["shards_skipped"], _shard_mtimes(out)) == (3, first)

    # Same-size corruption: only re-hashing can tell. Exactly that shard is repacked.
    shard1 = out / "shard-000001.tar"
    blob = bytearray(shard1.read_bytes())
    blob[600] ^= 0xFF
    shard1.write_bytes(bytes(blob))
    (out / "_done" / "shard-000002.json").unlink()  # a shard without its marker is not done
    assert _pack(*args) == 0
    s = _summary(out)
    assert (s["shards_written"], s["shards_skipped"]) == (2, 1)
    import hashlib
    marker = json.loads((out / "_done" / "shard-000001.json").read_text())
    assert hashlib.sha256(shard1.read_bytes()).hexdigest() == marker["sha256"]

    # The listing shrinks: the third shard is stale and goes (shard, index piece, marker);
    # an input that changed makes its shard's content differ, so that shard is repacked.
    (tmp_path / "in" / "img4.png").unlink()
    (tmp_path / "in" / "img0.png").write_bytes(_image(9))
    before = _shard_mtimes(out)
    assert _pack(*args) == 0
    s = _summary(out)
    assert (s["shards"], s["shards_written"], s["shards_skipped"], s["stale_removed"]) == (2, 1, 1, 3)
    after = _shard_mtimes(out)
    assert set(after) == {"shard-000000.tar", "shard-000001.tar"}
    assert after["shard-000001.tar"] == before["shard-000001.tar"]
    assert sorted(pq.read_table(out / "_index.parquet").column("key").to_pylist()) == \
        [f"img{i}.png" for i in range(4)]
    assert sorted(p.name for p in (out / "_index").iterdir()) == ["shard-000000.parquet", "shard-000001.parquet"]


def test_parquet_shards_from_manifest_with_unreadable_rows(ray_local, tmp_path, weights):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(_image(i))
    pq.write_table(pa.table({
        "url": ["img/0.png", "img/1.png", "img/2.png", "img/gone.png", "img/0.png"],
        "id": ["zero", "one", "two", "gone", "one"],  # "one" twice: a duplicate key
        "etag": ["e0", "e1", "e2", "e3", "e4"]}), tmp_path / "m.parquet")
    out = tmp_path / "packed"
    assert _pack("--input", str(tmp_path / "m.parquet"), "--uri-column", "url", "--key-column", "id",
                 "--output", str(out), "--format", "parquet", "--shard-size", "10") == 0
    s = _summary(out)
    assert (s["source_kind"], s["inputs"], s["packed"], s["errors"]) == ("manifest", 4, 2, 2)
    index = {r["key"]: r for r in pq.read_table(out / "_index.parquet").to_pylist()}
    assert index["gone"]["status"] == "error" and index["gone"]["error_type"] == "FileNotFoundError"
    assert index["gone"]["shard"] is None
    assert index["one"]["error_type"] == "DuplicateKey" and "2 inputs" in index["one"]["error_message"]
    assert index["zero"]["shard"] == "shard-000000.parquet" and index["zero"]["source_fingerprint"] == "e0"
    table = pq.read_table(out / "shard-000000.parquet")
    assert table.column_names == ["key", "image", "source_uri", "source_fingerprint"]
    assert table.column("key").to_pylist() == ["two", "zero"]
    assert table.column("image").to_pylist()[1] == (tmp_path / "img" / "0.png").read_bytes()
    masks, errors = _infer(str(out), str(tmp_path / "o"), weights)
    assert (masks, errors) == ({"two", "zero"}, set())
    # A read error is retried by the next run: once the object exists, it is packed.
    (tmp_path / "img" / "gone.png").write_bytes(_image(7))
    assert _pack("--input", str(tmp_path / "m.parquet"), "--uri-column", "url", "--key-column", "id",
                 "--output", str(out), "--format", "parquet", "--shard-size", "10") == 0
    s = _summary(out)
    assert (s["shards_written"], s["packed"], s["errors"]) == (1, 3, 1)
    assert pq.read_table(out / "shard-000000.parquet").column("key").to_pylist() == ["gone", "two", "zero"]


def test_s3_pack_with_explicit_worker_options(ray_local, s3_bucket, tmp_path):
    import boto3
    import ray

    from pipeline.config import SourceConfig
    from pipeline.pack import PackConfig, pack_shard, plan_shards, run_pack
    from pipeline.sources import plan_source

    s3 = boto3.client("s3")
    for i in range(4):
        s3.put_object(Bucket=s3_bucket, Key=f"images/d{i % 2}/{i}.png", Body=_image(i))
    source = SourceConfig(uri=f"s3://{s3_bucket}/images", kind="files")
    cfg = PackConfig(output=f"s3://{s3_bucket}/packed", shard_size=3)
    summary = run_pack(source, cfg)
    assert (summary["packed"], summary["shards"]) == (4, 2)
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="packed/")["Contents"]}
    assert {"packed/shard-000000.tar", "packed/shard-000001.tar", "packed/_index.parquet",
            "packed/_pack.json", "packed/_done/shard-000000.json"} <= listed

    # A worker whose own environment points at a dead endpoint with wrong keys still packs:
    # it uses only the options captured on the driver.
    bogus = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "wrong",
             "AWS_SECRET_ACCESS_KEY": "wrong"}
    spec = plan_shards(plan_source(source).units, cfg)[1]
    s3.delete_object(Bucket=s3_bucket, Key="packed/_done/shard-000001.json")

    def pack_in_hostile_env(spec, cfg, options):
        assert os.environ["AWS_ENDPOINT_URL"] == bogus["AWS_ENDPOINT_URL"]
        return pack_shard(spec, cfg, options)

    task = ray.remote(pack_in_hostile_env).options(runtime_env={"env_vars": bogus}, num_cpus=0.5)
    result = ray.get(task.remote(spec, cfg, source.storage_options))
    assert (result["skipped"], result["packed"]) == (False, 1)
    body = s3.get_object(Bucket=s3_bucket, Key="packed/shard-000001.tar")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        keys = [json.loads(tar.extractfile(m).read())["key"] for m in tar if m.name.endswith(".json")]
    assert keys == ["d1/3.png"]
