"""Faults injected into batch inference on a real 3-node Ray cluster, data in S3.

Each test kills or breaks one real part while a submitted job runs (a model actor, a worker
node, the driver, the object store) and then reads both output tables back from S3 with
boto3 + pyarrow: every input key must be there exactly once, in masks or mask_errors, and
only a broken input may be in mask_errors (a fault of the system is never an image's
error row).

Mid-run faults are triggered by what the job has written (the first masks file in S3, while
a model actor is alive), never by a sleep, and each test checks that the fault landed while
work remained; otherwise it would prove nothing. That work is held back on purpose: the job
reads its input through a proxy that keeps the second half of the images waiting until the
fault is in (`_half_held`), so no machine is fast enough to finish before it lands.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.cluster import (assert_every_key_once, list_keys, make_bucket, mask_keys, poll,
                           printed_json, put_images, put_weights, run_summary, s3_client, s3_env)
from tests.faulty_s3 import FaultyS3Proxy

pytestmark = pytest.mark.cluster

# 64 images at 128 px and one model actor: the job lists them sorted and reads them in two
# tasks of 32 (`files_per_read_task`), all of d0/ and then all of d1/. One actor also keeps
# the tier's CPU bill down: every actor start imports torch.
N_IMAGES, SIZE = 64, "128"
BROKEN = "d0/broken.jpg"  # an input that is the image's fault: it belongs in mask_errors


def _half_held(s3_server: str) -> FaultyS3Proxy:
    """The job's S3 endpoint for a mid-run fault: a proxy that holds every GET of a d1/
    image until `release()`. The d0/ half goes through, its masks are written, and the
    test injects its fault while the rest is still unread; then it lets the rest through.
    (Once the model ran ~3x faster in bf16, a job could end between two polls.)"""
    proxy = FaultyS3Proxy(s3_server).start()
    proxy.hold(r"/in/d1/[^/]+$")
    return proxy


def _inputs(endpoint: str, bucket: str, n: int = N_IMAGES, broken: bool = False
            ) -> tuple[list[str], str]:
    make_bucket(endpoint, bucket)
    keys = put_images(endpoint, bucket, "in", n)
    if broken:
        s3_client(endpoint).put_object(Bucket=bucket, Key=f"in/{BROKEN}", Body=b"\xff\xd8 no jpeg")
        keys.append(BROKEN)
    return keys, put_weights(endpoint, bucket, "models/u2netp.pth")


def _args(bucket: str, weights: str, size: str = SIZE) -> list[str]:
    return ["--input", f"s3://{bucket}/in", "--output", f"s3://{bucket}/out", "--model", "u2netp",
            "--weights", weights, "--input-size", size, "--batch-size", "4", "--actors", "1",
            "--cpus-per-actor", "1", "--rows-per-file", "8"]


def _written(endpoint: str, bucket: str) -> int:
    """Number of masks files in S3: the job's own progress, as a reader sees it."""
    return len([k for k in list_keys(endpoint, bucket, "out/masks/") if k.endswith(".parquet")])


def _model_actor_on_worker(cluster):
    """A live U2NetPredictor actor on a worker node (the head runs none), with its node."""
    for actor in cluster.actors("U2NetPredictor"):
        node = cluster.node_of(actor["node_id"])
        if node is not None and node.name != "head" and actor.get("pid"):
            return actor, node
    return None


def _assert_mid_run(endpoint: str, bucket: str, n: int = N_IMAGES) -> int:
    """The fault landed while work remained: no finished run, not every mask written yet."""
    assert run_summary(endpoint, bucket, "out") is None, "the run had already finished"
    done = len(set(mask_keys(endpoint, bucket, "out")[0]))
    assert done < n, "every mask was already written when the fault hit"
    return done


def test_model_actor_killed_mid_run(ray_cluster, s3_server):
    bucket = "fault-actor"
    keys, weights = _inputs(s3_server, bucket)
    with _half_held(s3_server) as store:
        job = ray_cluster.submit(_args(bucket, weights), s3_env(store.endpoint))
        actor, _ = job.wait_until(
            lambda: _written(s3_server, bucket) and _model_actor_on_worker(ray_cluster),
            "the first masks file while the model actor is alive")
        os.kill(actor["pid"], signal.SIGKILL)  # the actor's worker process, on this host
        _assert_mid_run(s3_server, bucket)
        store.release()
        poll(lambda: not _alive(actor["pid"]), 30, f"actor process {actor['pid']} to die")
        # The job's only model actor is gone: it goes on only if Ray Data brings one back.
        job.wait_until(lambda: [a for a in ray_cluster.actors("U2NetPredictor")
                                if a.get("pid") and a["pid"] != actor["pid"]],
                       "a model actor to replace the killed one")
        job.succeeded()
    assert_every_key_once(s3_server, bucket, "out", keys)
    summary = run_summary(s3_server, bucket, "out")
    assert summary["masks"] == N_IMAGES and summary["errors"] == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            # A zombie is dead too: only its parent (the raylet) can reap it.
            return f.read().split(") ", 1)[1][0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_worker_node_killed_mid_run(ray_cluster, s3_server):
    bucket = "fault-node"
    keys, weights = _inputs(s3_server, bucket)
    store = _half_held(s3_server)
    job = ray_cluster.submit(_args(bucket, weights), s3_env(store.endpoint))
    _, node = job.wait_until(
        lambda: _written(s3_server, bucket) and _model_actor_on_worker(ray_cluster),
        "the first masks file while the model actor runs on a worker node")
    replacement = None
    try:
        ray_cluster.kill_node(node)  # raylet, object store, agents, workers: the whole machine
        _assert_mid_run(s3_server, bucket)
        store.release()
        # A replacement joins while the job goes on, as an autoscaler would bring one; the
        # job must get through on what is left meanwhile (the head has no CPUs, so one
        # worker node), and the next tests get a 3-node cluster again.
        replacement = ray_cluster.start_worker(wait=False)
        info = job.succeeded()
        ray_cluster.wait_dead(node.name)
        # The driver was never on the killed node: it runs on the head, the model on workers.
        assert ray_cluster.node_of(info["driver_node_id"]).name == "head"
        assert_every_key_once(s3_server, bucket, "out", keys)
        assert run_summary(s3_server, bucket, "out")["masks"] == N_IMAGES
    finally:
        store.stop()
        if replacement is None and node.name not in ray_cluster.nodes:
            replacement = ray_cluster.start_worker(wait=False)
        if replacement is not None:
            ray_cluster.wait_alive([replacement.name])


def test_driver_stopped_mid_run_then_resubmitted(ray_cluster, s3_server):
    """`ray job stop` once the first masks are written, then the same submission again: the
    rerun skips what is done and ends with every key once, the broken input in mask_errors."""
    bucket = "fault-driver"
    keys, weights = _inputs(s3_server, bucket, broken=True)
    with _half_held(s3_server) as store:
        first = ray_cluster.submit(_args(bucket, weights), s3_env(store.endpoint))
        first.wait_until(lambda: _written(s3_server, bucket), "the first masks file")
        first.stop()  # `ray job stop`: SIGTERM to the driver, SIGKILL after a grace period
        assert first.wait() == "STOPPED"
        # Nothing writes any more: the job's workers die with its driver.
        done = _assert_mid_run(s3_server, bucket)
    assert done > 0

    second = ray_cluster.submit(_args(bucket, weights), s3_env(s3_server))
    second.succeeded()
    assert_every_key_once(s3_server, bucket, "out", keys, expect_errors=[BROKEN])
    summary = run_summary(s3_server, bucket, "out")  # written last: the run finished
    assert (summary["inputs"], summary["masks"], summary["errors"]) == (N_IMAGES + 1, N_IMAGES, 1)
    # The rerun skipped what the stopped run had finished and processed only the rest.
    assert summary["skipped_done"] == done, summary
    assert summary["processed"] == N_IMAGES + 1 - done, summary
    # What the job printed (its last word on stdout) is the summary's brief.
    brief = printed_json(second.logs(), "run_id")
    assert (brief["run_id"], brief["inputs"]) == (summary["run_id"], N_IMAGES + 1)


def test_storage_faults_are_retried_and_lasting_outages_fail_in_one_line(ray_cluster, s3_server):
    """Three jobs at once, sharing the cluster (two of them only wait out retry back-off, so
    running them side by side saves a minute of the tier):

    - behind a proxy that answers 30% of requests with 503 SlowDown or 500 InternalError and
      delays 20% of the others, for at least 10 s and until the job's first write was refused
      too, then passes everything: the job retries, succeeds, and every key is in masks once;
    - with an endpoint where nothing listens, and behind a proxy that answers 503 to every
      request: each job ends, once the S3 client's retries are spent, with exit code 2 and
      one `error:` line, not a traceback and not a hang.
    """
    bucket = "fault-s3"
    keys, weights = _inputs(s3_server, bucket, n=24)
    flaky = FaultyS3Proxy(s3_server, seed=1).start()
    down = FaultyS3Proxy(s3_server).start()
    try:
        flaky.inject(error_rate=0.3, delay_rate=0.2, delay_s=(0.05, 0.5), duration=10,
                     fail_first={"PUT": 1}, max_duration=180)
        down.refuse_all()
        # A port nothing listens on: free now, and outside the kernel's ephemeral range, so
        # no other program is handed it by chance while the job knocks.
        closed_port = ray_cluster.ports.one()
        t0 = time.monotonic()
        job = ray_cluster.submit(_args(bucket, weights, size="64"), s3_env(flaky.endpoint))
        # Same arguments: a job that could reach the store would find inputs and weights.
        doomed = [ray_cluster.submit(_args(bucket, weights, size="64"), s3_env(endpoint))
                  for endpoint in (f"http://127.0.0.1:{closed_port}", down.endpoint)]
        job.succeeded()
        flaky_stats = flaky.snapshot()
        for failing in doomed:
            assert failing.wait(timeout=300) == "FAILED", failing.logs()[-3000:]
            info = failing.info()
            assert info["driver_exit_code"] == 2, info
            logs = failing.logs()
            lines = [line for line in logs.splitlines() if line.strip()]
            errors = [line for line in lines if line.startswith("error:")]
            assert len(errors) == 1 and lines[-1] == errors[0], lines[-20:]
            assert "storage unavailable" in errors[0], errors[0]
            assert "Traceback" not in logs
        elapsed = time.monotonic() - t0
        down_stats = down.snapshot()
    finally:
        flaky.stop()
        down.stop()

    # The faults did hit reads and writes, and the jobs were slowed, not failed, by them.
    assert flaky_stats["failed_methods"].get("GET", 0) >= 3, flaky_stats
    assert flaky_stats["failed_methods"].get("PUT", 0) >= 1, flaky_stats
    assert flaky_stats["delayed"] >= 1, flaky_stats
    assert_every_key_once(s3_server, bucket, "out", keys)  # retried, not recorded as errors
    assert run_summary(s3_server, bucket, "out")["masks"] == 24
    # The refused job's client did retry before giving up, and gave up in bounded time.
    assert down_stats["failed"] >= 8, down_stats
    assert elapsed < 300
