"""What the nightly job costs when little or nothing changed.

    python bench/plan_incremental.py                       # 100k keys, 2k-file no-change run
    python bench/plan_incremental.py --keys 1000000 --files 0

1. Planning at scale: a local Iceberg `masks` table of `--keys` generated rows (tiny prob_maps,
   written with pyiceberg directly) against a listing of as many keys in which 1% changed,
   1% are new and 1% are gone; also a shard listing of the same keys (100 keys per shard). Times
   the table read (planning columns only), the planner and the chunking, each best of `--repeat`.
2. A no-change night: `--files` small PNGs whose masks are already in the tables (rows written
   directly with the fingerprints of the listing and the job's model_id), then the real
   `python -m jobs.reprocess` as a subprocess: wall time including Python and local Ray
   start-up, and the job's own `wall_seconds` and timings. It must process nothing.

Prints one JSON report (also written to --report).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._machine import machine_info  # noqa: E402  (after the path set-up)


def best_of(repeat: int, fn):
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return round(min(times), 4), result


def mask_rows(keys: list[str], uris: list[str], fps: list[str], model_id: str) -> pa.Table:
    from pipeline.iceberg import MASKS_ARROW

    n = len(keys)
    now = datetime.now(timezone.utc)
    cols = {
        "key": keys, "source_uri": uris, "source_fingerprint": fps,
        "content_sha256": ["0" * 64] * n,
        "width": np.full(n, 64, np.int32), "height": np.full(n, 64, np.int32),
        "prob_map": [b"\x80" * 16] * n,  # tiny maps: the planner never reads them
        "map_height": np.full(n, 4, np.int32), "map_width": np.full(n, 4, np.int32),
        "mask_png": pa.nulls(n, pa.binary()), "mask_rle": pa.nulls(n, pa.string()),
        "coverage": np.full(n, 0.5, np.float32), "bbox": pa.nulls(n, MASKS_ARROW.field("bbox").type),
        "model": ["u2netp"] * n, "model_id": [model_id] * n, "run_id": ["bench"] * n,
        "processed_at": pa.array([now] * n, MASKS_ARROW.field("processed_at").type),
    }
    return pa.table({f.name: pa.array(cols[f.name], f.type) if not isinstance(cols[f.name], pa.Array)
                     else cols[f.name] for f in MASKS_ARROW}, schema=MASKS_ARROW)


def bench_planning(work: Path, n: int, repeat: int, chunk_size: int) -> dict:
    from pipeline import iceberg
    from pipeline.incremental import iter_chunks, plan_work, read_stored
    from pipeline.sources import UNIT_SCHEMA, Plan

    rng = np.random.default_rng(0)
    keys = [f"photos/{i // 1000:04d}/{i:08d}.jpg" for i in range(n)]
    fps = [f"{100_000 + i}-{i * 7919 % 1_000_003}" for i in range(n)]
    settings = iceberg.CatalogSettings(warehouse=str(work / "wh-plan"))
    tables = iceberg.open_tables(settings)
    t = time.perf_counter()
    for start in range(0, n, 250_000):  # a few data files, as a few nightly chunks would leave
        stop = min(n, start + 250_000)
        tables.masks.append(mask_rows(keys[start:stop], [f"s3://b/{k}" for k in keys[start:stop]],
                                      fps[start:stop], "model-A"))
    write_s = time.perf_counter() - t

    # The listing tonight: 1% changed, 1% new, 1% gone.
    idx = rng.permutation(n)
    k = max(1, n // 100)
    changed, gone = set(idx[:k].tolist()), set(idx[k:2 * k].tolist())
    listed_keys, listed_fps = [], []
    for i in range(n):
        if i in gone:
            continue
        listed_keys.append(keys[i])
        listed_fps.append(fps[i] + ("-v2" if i in changed else ""))
    listed_keys += [f"photos/new/{i:08d}.jpg" for i in range(k)]
    listed_fps += [f"1-{i}" for i in range(k)]
    order = np.argsort(listed_keys)
    listed_keys = [listed_keys[i] for i in order]
    listed_fps = [listed_fps[i] for i in order]
    m = len(listed_keys)
    units = pa.table({"unit_uri": [f"s3://b/{x}" for x in listed_keys], "unit_kind": ["files"] * m,
                      "key": listed_keys, "fingerprint": listed_fps, "size": np.full(m, 100_000),
                      "root": ["s3://b"] * m}, schema=UNIT_SCHEMA)
    plan = Plan("files", "s3://b", units, m)

    read_s, stored = best_of(repeat, lambda: read_stored(iceberg.load_tables(settings)))
    plan_s, work_plan = best_of(repeat, lambda: plan_work(plan, stored, "model-A", prune=True))
    chunk_s, chunks = best_of(repeat, lambda: list(iter_chunks(work_plan, chunk_size)))
    assert work_plan.reasons["changed"] == k and work_plan.reasons["new"] == k
    assert len(work_plan.prune_masks) == k
    stale_s, stale = best_of(repeat, lambda: plan_work(plan, stored, "model-B"))
    assert stale.work.num_rows == m

    # The same keys as WebDataset shards of 100 samples (keys known only per shard).
    shard_of = [f"s3://b/shards/{i // 100:06d}.tar" for i in range(n)]
    shard_stored = type(stored)(
        pa.table({"key": keys, "source_uri": [f"{s}#{i:08d}.jpg" for i, s in enumerate(shard_of)],
                  "source_fingerprint": [f"fp-{i // 100}" for i in range(n)],
                  "model_id": ["model-A"] * n}),
        stored.errors)
    shards = sorted(set(shard_of))
    s = len(shards)
    shard_fps = [f"fp-{j}" + ("-v2" if j % 100 == 0 else "") for j in range(s)]  # 1% rewritten
    shard_units = pa.table({"unit_uri": shards, "unit_kind": ["webdataset"] * s, "key": pa.nulls(s, pa.string()),
                            "fingerprint": shard_fps, "size": np.full(s, 10_000_000),
                            "root": ["s3://b/shards"] * s}, schema=UNIT_SCHEMA)
    shard_plan = Plan("webdataset", "s3://b/shards", shard_units, s)
    units_s, unit_work = best_of(repeat, lambda: plan_work(shard_plan, shard_stored, "model-A", prune=True))
    assert unit_work.reasons["changed"] == len(range(0, s, 100))

    # --prune of the gone keys: one copy-on-write delete commit on the driver.
    masks = iceberg.load_tables(settings).masks
    t = time.perf_counter()
    iceberg.delete_keys(masks, work_plan.prune_masks, {"u2net.operation": "prune"})
    prune_s = time.perf_counter() - t
    masks.refresh()
    assert iceberg.read_columns(masks, ["key"]).num_rows == n - k

    files = iceberg.current_data_files(masks)
    return {
        "table_rows": n, "listed_keys": m, "changed": k, "new": k, "gone": k,
        "table_data_files": len(files),
        "write_table_s": round(write_s, 3),
        "read_planning_columns_s": read_s,
        "plan_files_s": plan_s,
        "plan_new_model_id_s": stale_s,
        "chunking_s": chunk_s, "chunks": len(chunks), "chunk_size": chunk_size,
        "plan_shards_s": units_s, "shards": s,
        "total_plan_s": round(read_s + plan_s + chunk_s, 4),
        "prune_commit_s": round(prune_s, 3), "pruned": k,
    }


def bench_no_change_run(work: Path, files: int, weights: str) -> dict:
    from PIL import Image

    from pipeline import iceberg
    from pipeline.config import MaskPipelineConfig, ModelConfig, SourceConfig
    from pipeline.predict import compute_model_id
    from pipeline.sources import plan_source
    from u2net_core import build_model, load_weights

    inp = work / "images"
    rng = np.random.default_rng(1)
    for i in range(files):
        p = inp / f"d{i % 20:02d}" / f"img{i:05d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
        p.write_bytes(buf.getvalue())
    size = 64
    cfg = MaskPipelineConfig(source=SourceConfig(uri=str(inp)),
                             model=ModelConfig(name="u2netp", weights=weights, input_size=size))
    model_id = compute_model_id(load_weights(build_model("u2netp"), weights).state_dict(),
                                cfg.output_settings())
    listing = plan_source(cfg.source)
    settings = iceberg.CatalogSettings(warehouse=str(work / "wh-nightly"))
    tables = iceberg.open_tables(settings)
    tables.masks.append(mask_rows(listing.units.column("key").to_pylist(),
                                  listing.units.column("unit_uri").to_pylist(),
                                  listing.units.column("fingerprint").to_pylist(), model_id))
    summary_path = work / "summary.json"
    cmd = [sys.executable, "-m", "jobs.reprocess", "--input", str(inp), "--warehouse", settings.warehouse,
           "--model", "u2netp", "--weights", weights, "--input-size", str(size), "--prune",
           "--summary", str(summary_path), "--num-cpus", "2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    summary = json.loads(summary_path.read_text())
    assert summary["processed"] == 0 and summary["unchanged"] == files, summary
    return {"files": files, "command": " ".join(cmd[1:]), "subprocess_wall_s": round(wall, 3),
            "job_wall_seconds": summary["wall_seconds"], "job_timings": summary["timings"],
            "processed": summary["processed"], "unchanged": summary["unchanged"],
            "chunks_committed": summary["chunks_committed"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=100_000, help="rows in the table and keys listed")
    p.add_argument("--files", type=int, default=2000, help="files of the no-change run (0: skip it)")
    p.add_argument("--repeat", type=int, default=3, help="best of N for the planning timings")
    p.add_argument("--chunk-size", type=int, default=10_000, help="chunk size for the chunking timing")
    p.add_argument("--report", default=None, help="also write the JSON report here")
    args = p.parse_args()

    import torch

    from u2net_core import build_model, save_weights

    work = Path(tempfile.mkdtemp(prefix="u2net-plan-bench-"))
    try:
        torch.manual_seed(0)
        weights = str(work / "u2netp.pth")
        save_weights(build_model("u2netp"), weights)
        report = {"machine": machine_info(), "planning": bench_planning(work, args.keys, args.repeat,
                                                                   args.chunk_size)}
        if args.files:
            report["no_change_run"] = bench_no_change_run(work, args.files, weights)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        Path(args.report).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
