"""Training and the nightly job submitted to a real 3-node Ray cluster, with the fault each
must survive: a training worker killed mid-run, and a nightly run stopped between commits.

Data, checkpoints and the Iceberg warehouse live in S3 (no shared disk); only the nightly
job's SQLite catalog is a file, on the head node where its driver runs (a production
cluster would point --catalog-uri at Postgres or a REST catalog instead).
"""

from __future__ import annotations

import io
import json
import os
import signal

import pytest

from tests.cluster import (list_keys, make_bucket, printed_json, put_images, put_weights,
                           s3_client, s3_env)

pytestmark = pytest.mark.cluster


def _upload_tree(endpoint: str, bucket: str, root, prefix: str) -> None:
    s3 = s3_client(endpoint)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root).as_posix()}",
                          Body=path.read_bytes())


# ------------------------------------------------------------------------------------ train

EPOCHS = 3


def test_training_worker_killed_mid_run_resumes_from_checkpoint(ray_cluster, s3_server, tmp_path):
    """2 DDP workers, 3 epochs, `--max-failures 1`: after epoch 1's checkpoint is registered,
    one training worker process is SIGKILLed; the run restarts its workers from that
    checkpoint and finishes every epoch once. DUTS-style folders of images and masks in S3."""
    from jobs.make_dataset import write_dataset

    bucket = make_bucket(s3_server, "cluster-train")
    n_train, n_val = 12, 3
    write_dataset(tmp_path / "duts", count=n_train, seed=3, size=64, val_count=n_val)
    _upload_tree(s3_server, bucket, tmp_path / "duts", "duts")
    run = "runs/r1"
    job = ray_cluster.submit(
        ["--images", f"s3://{bucket}/duts/images", "--masks", f"s3://{bucket}/duts/masks",
         "--val-images", f"s3://{bucket}/duts/val/images",
         "--val-masks", f"s3://{bucket}/duts/val/masks",
         "--output", f"s3://{bucket}/runs", "--name", "r1", "--model", "u2netp",
         "--input-size", "64", "--crop-size", "56", "--batch-size", "3", "--workers", "2",
         "--epochs", str(EPOCHS), "--max-failures", "1", "--keep-checkpoints", "0"],
        s3_env(s3_server), module="jobs.train")

    def checkpoints() -> set[str]:
        return {k.split("/")[2] for k in list_keys(s3_server, bucket, f"{run}/checkpoint_epoch_")}

    def registered_epoch() -> int:
        """The epoch of the latest checkpoint Ray Train has *registered* (its controller's
        snapshot in S3). A checkpoint folder appears earlier, while the other rank may not
        have reported that epoch yet; a worker killed then takes the checkpoint with it, and
        the restart would rightly begin from scratch, which is not what this test is about."""
        s3 = s3_client(s3_server)
        try:
            body = s3.get_object(Bucket=bucket,
                                 Key=f"{run}/checkpoint_manager_snapshot.json")["Body"].read()
        except s3.exceptions.NoSuchKey:
            return 0
        latest = json.loads(body).get("latest_checkpoint_result") or {}
        return int((latest.get("metrics") or {}).get("epoch", 0))

    def worker_after_first_checkpoint():
        if registered_epoch() < 1:
            return None
        workers = [a for a in ray_cluster.state("actors", state="ALIVE")
                   if "RayTrainWorker" in (a.get("class_name") or "") and a.get("pid")]
        return workers[-1] if len(workers) == 2 else None

    worker = job.wait_until(worker_after_first_checkpoint,
                            "a registered checkpoint with both training workers alive")
    os.kill(worker["pid"], signal.SIGKILL)
    resumable = registered_epoch()
    # Killed before the last epoch was saved: the restart has work left to resume.
    assert 1 <= resumable < EPOCHS, resumable
    assert f"checkpoint_epoch_{EPOCHS:06d}" not in checkpoints()

    job.succeeded(timeout=400)
    logs = job.logs()
    summary = printed_json(logs, "epochs_trained")
    # The attempt that finished resumed from the checkpoint registered before the kill (or a
    # later one), not from scratch, and trained exactly the epochs after it.
    assert summary["start_epoch"] >= resumable, (summary, logs[-8000:])
    assert summary["epochs_trained"] == list(range(summary["start_epoch"] + 1, EPOCHS + 1))
    body = s3_client(s3_server).get_object(Bucket=bucket, Key=f"{run}/metrics.jsonl")["Body"].read()
    rows = [json.loads(line) for line in body.decode().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))  # every epoch, once
    assert all(r["train_samples"] == n_train and r["val_samples"] == n_val for r in rows), rows
    assert checkpoints() >= {f"checkpoint_epoch_{e:06d}" for e in range(1, EPOCHS + 1)}

    import torch

    from u2net_core import build_model, load_weights

    weights = s3_client(s3_server).get_object(Bucket=bucket, Key=f"{run}/weights.pth")["Body"].read()
    load_weights(build_model("u2netp"), torch.load(io.BytesIO(weights), weights_only=True))


# -------------------------------------------------------------------------------- reprocess

N_NIGHTLY, CHUNK = 24, 12


def _iceberg(bucket: str, catalog: str):
    from pipeline.iceberg import CatalogSettings, load_tables

    return load_tables(CatalogSettings(warehouse=f"s3://{bucket}/warehouse", uri=catalog))


def _committed_runs(bucket: str, catalog: str) -> list[str]:
    """Run ids of the chunk commits in the masks table's history (none before the tables
    exist)."""
    try:
        masks = _iceberg(bucket, catalog).masks
    except Exception:  # the catalog or the tables are not created yet
        return []
    return [s.summary.get("u2net.run-id") for s in masks.snapshots()
            if s.summary.get("u2net.run-id")]


def _iceberg_keys(endpoint: str, bucket: str, catalog: str) -> dict[str, list[str]]:
    """Keys in the current snapshot of both tables, read from the data files in S3 with
    boto3 + pyarrow (the catalog only says which files are current)."""
    import pyarrow.parquet as pq

    from pipeline.iceberg import current_data_files

    tables = _iceberg(bucket, catalog)
    s3 = s3_client(endpoint)
    out = {}
    for name, table in (("masks", tables.masks), ("errors", tables.errors)):
        keys = []
        for uri in current_data_files(table):
            b, _, key = uri.removeprefix("s3://").partition("/")
            body = s3.get_object(Bucket=b, Key=key)["Body"].read()
            keys += pq.read_table(io.BytesIO(body), columns=["key"]).column("key").to_pylist()
        out[name] = keys
    return out


def test_nightly_run_stopped_between_commits_resumes(ray_cluster, s3_server):
    bucket = make_bucket(s3_server, "cluster-nightly")
    keys = put_images(s3_server, bucket, "in", N_NIGHTLY)
    weights = put_weights(s3_server, bucket, "models/u2netp.pth")
    catalog = f"sqlite:///{ray_cluster.root / 'catalogs' / bucket}.db"
    args = ["--input", f"s3://{bucket}/in", "--warehouse", f"s3://{bucket}/warehouse",
            "--catalog-uri", catalog, "--model", "u2netp", "--weights", weights,
            "--input-size", "64", "--chunk-size", str(CHUNK), "--actors", "1",
            "--summary", f"s3://{bucket}/summary.json"]

    first = ray_cluster.submit(args, s3_env(s3_server), module="jobs.reprocess")
    first.wait_until(lambda: _committed_runs(bucket, catalog), "the first chunk's commit")
    first.stop()
    assert first.wait() == "STOPPED"
    stopped_run = _committed_runs(bucket, catalog)[0]
    done = _iceberg_keys(s3_server, bucket, catalog)
    assert len(done["masks"]) == len(set(done["masks"]))
    assert CHUNK <= len(done["masks"]) < N_NIGHTLY, "the stop must land between two commits"

    second = ray_cluster.submit(args, s3_env(s3_server), module="jobs.reprocess")
    second.succeeded()
    summary = json.loads(s3_client(s3_server).get_object(Bucket=bucket, Key="summary.json")["Body"].read())
    # It continued from the last commit: what was committed is unchanged, the rest processed.
    assert summary["unchanged"] == len(done["masks"]), summary
    assert summary["processed"] == N_NIGHTLY - len(done["masks"]), summary
    final = _iceberg_keys(s3_server, bucket, catalog)
    assert len(final["masks"]) == len(set(final["masks"])), "duplicate keys in masks"
    assert sorted(final["masks"]) == sorted(keys) and final["errors"] == []
    runs = _committed_runs(bucket, catalog)
    assert stopped_run in runs and summary["run_id"] in runs  # history holds both runs
