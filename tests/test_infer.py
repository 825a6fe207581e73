"""The batch inference job end to end on a real local Ray: sources, bad inputs, reruns, S3."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from tests.corpus import write_bad_inputs
from u2net_core import build_model, decode_image, load_weights, normalize, probabilities, to_uint8_map

SIZE = 64  # small model input: the logic is the same at 320, the CPU time is not


def _infer(args: list[str]) -> int:
    from jobs import infer

    return infer.main(args)


def _run(input_uri, output_uri, weights, *extra) -> dict:
    rc = _infer(["--input", str(input_uri), "--output", str(output_uri), "--model", "u2netp",
                 "--weights", weights, "--input-size", str(SIZE), *extra])
    assert rc == 0
    from pipeline import storage
    return json.loads(storage.read_bytes(storage.join_uri(str(output_uri), "_run.json")))


def _tables(output: str):
    from pipeline import storage

    def read(name):
        pafs, path = storage.pyarrow_filesystem(storage.join_uri(output, name))
        return pq.read_table(path, filesystem=pafs)
    return read("masks"), read("mask_errors")


def _expected_map(model, data: bytes) -> np.ndarray:
    img = decode_image(data, SIZE)
    with torch.inference_mode():
        d0 = model(normalize(img.array[None], gray=[img.gray]))[0]
    return to_uint8_map(probabilities(d0))[0]


def _write_images(folder: Path, n: int, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        arr = (rng.random((40 + i, 50 + 2 * i, 3)) * 255).astype(np.uint8)
        arr[10:30, 15:35] = 255
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        rel = f"sub{i % 2}/img{i}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(buf.getvalue())
        out[rel] = buf.getvalue()
    return out


def test_cpu_stage_workers_do_not_import_torch():
    """Ray's read, decode, postprocess and write workers import these modules and nothing
    else of ours: torch would add ~124 MiB of private memory to each of those processes."""
    code = ("import sys, pipeline.sources, pipeline.decode, pipeline.postprocess, pipeline.sinks, "
            "pipeline.iceberg, pipeline.shards, pipeline.pack; "
            "import u2net_core; u2net_core.decode_image; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_bad_input_corpus_every_key_once(ray_local, tmp_path, weights):
    corpus = write_bad_inputs(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not an image extension: not an input")
    summary = _run(tmp_path / "in", tmp_path / "out", weights, "--mask-png", "--mask-rle")
    masks, errors = _tables(str(tmp_path / "out"))
    mkeys, ekeys = masks.column("key").to_pylist(), errors.column("key").to_pylist()
    assert len(set(mkeys)) == len(mkeys) and len(set(ekeys)) == len(ekeys)
    assert not set(mkeys) & set(ekeys)
    assert set(mkeys) | set(ekeys) == set(corpus)  # nothing lost, nothing invented
    for name, exp in corpus.items():
        assert (name in mkeys) == (exp["outcome"] == "ok"), (name, exp)
    rows = {r["key"]: r for r in masks.to_pylist()}
    for name, exp in corpus.items():
        if exp["outcome"] == "ok":
            r = rows[name]
            assert (r["width"], r["height"]) == (exp["width"], exp["height"]), name
            assert len(r["prob_map"]) == SIZE * SIZE and r["map_height"] == r["map_width"] == SIZE
            png = Image.open(io.BytesIO(r["mask_png"]))
            assert png.mode == "L" and png.size == (exp["width"], exp["height"])
            assert r["mask_rle"] is not None
    for r in errors.to_pylist():
        assert r["stage"] in {"read", "decode"} and r["error_type"] and r["error_message"]
    bomb = next(r for r in errors.to_pylist() if "bomb" in r["key"])
    assert bomb["error_type"] == "DecompressionBomb"
    assert summary["inputs"] == summary["masks"] + summary["errors"] == len(corpus)
    assert summary["listed"] == len(corpus)
    # Where the time went, per stage; failed rows flow through every stage as data.
    stages = summary["stages"]
    assert stages["MapBatches(U2NetPredictor)"]["rows"] == len(corpus)
    assert all(s["task_wall_s"] is not None and s["task_wall_s"] >= 0 for s in stages.values())


def test_maps_equal_u2net_core_and_independent_readers(ray_local, tmp_path, weights):
    images = _write_images(tmp_path / "in", 5)
    _run(tmp_path / "in", tmp_path / "out", weights, "--precision", "fp32")  # the reference's
    model = load_weights(build_model("u2netp"), weights).eval()
    masks, errors = _tables(str(tmp_path / "out"))
    assert errors.num_rows == 0 and masks.num_rows == 5
    for r in masks.to_pylist():
        got = np.frombuffer(r["prob_map"], np.uint8).reshape(SIZE, SIZE)
        want = _expected_map(model, images[r["key"]])
        assert np.abs(got.astype(int) - want).max() <= 1, r["key"]  # batched vs single conv rounding
        assert r["source_uri"] == str(tmp_path / "in" / r["key"])
    import duckdb

    n, distinct, bad = duckdb.sql(
        f"select count(*), count(distinct key), count(*) filter (where octet_length(prob_map) != {SIZE * SIZE}) "
        f"from read_parquet('{tmp_path / 'out' / 'masks'}/*.parquet')").fetchall()[0]
    assert (n, distinct, bad) == (5, 5, 0)


def _write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_keys_duplicates_and_hostile_names(ray_local, tmp_path, weights):
    imgs = list(_write_images(tmp_path / "raw", 4).values())
    (tmp_path / "in" / "part").mkdir(parents=True)
    _write_shard(tmp_path / "in" / "part" / "s0.tar", [
        ("000.png", imgs[0]), ("000.cls", b"1"),
        ("../../escape.png", imgs[1]),
        ("/abs/evil.png", imgs[2]),
        ("dup.png", imgs[3]), ("other.txt", b"x"), ("dup.png", imgs[0]),  # dup: two samples
        ("nojpg.txt", b"only text"),
    ])
    _write_shard(tmp_path / "in" / "s1.tar", [
        ("a.png", imgs[0]), ("a.json", json.dumps({"key": "photos/orig.png"}).encode()),
        ("b.jpg", b"corrupt bytes"),
    ])
    cut = tmp_path / "cutouts"
    _run(tmp_path / "in", tmp_path / "out", weights, "--cutouts", str(cut))
    masks, errors = _tables(str(tmp_path / "out"))
    mk = set(masks.column("key").to_pylist())
    ek = {r["key"]: r for r in errors.to_pylist()}
    assert mk == {"part/s0.tar/000", "part/s0.tar/../../escape", "part/s0.tar//abs/evil", "photos/orig.png"}
    assert ek["part/s0.tar/dup"]["error_type"] == "DuplicateKey"
    assert ek["part/s0.tar/nojpg"]["error_type"] == "NoImageMember"
    assert ek["s1.tar/b"]["stage"] == "decode"
    # cutouts: one per mask, all inside the cutouts folder, RGBA at the original size
    files = sorted(p for p in cut.rglob("*.png"))
    assert len(files) == 4
    assert all(cut in p.parents for p in files)
    assert not (tmp_path / "escape.png").exists() and not list(tmp_path.glob("escape*"))
    assert Image.open(files[0]).mode == "RGBA"


def test_parquet_source_and_rerun_is_idempotent(ray_local, tmp_path, weights):
    images = _write_images(tmp_path / "raw", 6)
    (tmp_path / "in").mkdir()
    items = list(images.items())
    pq.write_table(pa.table({"id": [k for k, _ in items[:4]], "img": [v for _, v in items[:4]]}),
                   tmp_path / "in" / "a.parquet")
    pq.write_table(pa.table({"id": [k for k, _ in items[4:]] + ["broken"],
                             "img": [v for _, v in items[4:]] + [b"junk"]}),
                   tmp_path / "in" / "b.parquet")
    args = ("--key-column", "id", "--image-column", "img")
    s1 = _run(tmp_path / "in", tmp_path / "out", weights, *args)
    assert (s1["masks"], s1["errors"], s1["source_kind"]) == (6, 1, "parquet")
    s2 = _run(tmp_path / "in", tmp_path / "out", weights, *args)
    assert s2["processed"] == 1 and s2["skipped_done"] == 6  # only the failed key is retried
    masks, errors = _tables(str(tmp_path / "out"))
    assert masks.num_rows == 6 and errors.num_rows == 1
    assert sorted(masks.column("key").to_pylist()) == sorted(images)


def test_rerun_after_kill_every_key_once(ray_local, tmp_path, weights):
    """Kill a run once its first files are written; the rerun completes with no duplicates."""
    n = 40
    _write_images(tmp_path / "in", n)
    out = tmp_path / "out"
    # 160 px: slow enough (a few seconds of model time) to be killed between two file writes
    cmd = [sys.executable, "-m", "jobs.infer", "--input", str(tmp_path / "in"), "--output", str(out),
           "--model", "u2netp", "--weights", weights, "--input-size", "160",
           "--rows-per-file", "4", "--batch-size", "2", "--num-cpus", "2"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    import time
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "masks").glob("*.parquet")):
        time.sleep(0.05)
    os.killpg(proc.pid, 9)
    proc.wait()
    first = list((out / "masks").glob("*.parquet"))
    assert first and not (out / "_run.json").exists()
    s = _run(tmp_path / "in", out, weights, "--input-size", "160")
    masks, errors = _tables(str(out))
    keys = masks.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == n and errors.num_rows == 0
    assert s["skipped_done"] >= 1


def test_s3_input_and_output(ray_local, s3_bucket, tmp_path, weights):
    import boto3

    images = _write_images(tmp_path / "in", 3)
    s3 = boto3.client("s3")
    for k, v in images.items():
        s3.put_object(Bucket=s3_bucket, Key=f"images/{k}", Body=v)
    s3.put_object(Bucket=s3_bucket, Key="images/bad.jpg", Body=b"\xff\xd8garbage")
    s = _run(f"s3://{s3_bucket}/images", f"s3://{s3_bucket}/out", weights)
    assert (s["masks"], s["errors"]) == (3, 1)
    masks, errors = _tables(f"s3://{s3_bucket}/out")
    assert sorted(masks.column("key").to_pylist()) == sorted(images)
    assert masks.column("source_uri")[0].as_py().startswith(f"s3://{s3_bucket}/images/")
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"]]
    assert "out/_run.json" in listed


def test_job_level_errors_are_one_line(tmp_path, weights, capsys):
    assert _infer(["--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "--weights is required" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _infer(["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o"),
                   "--weights", weights, "--model", "u2netp"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no inputs found") and err.count("\n") == 1
    assert _infer(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"),
                   "--weights", str(tmp_path / "missing.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err
