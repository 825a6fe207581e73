"""Shared fixtures: one real local Ray per test session, and a real S3 HTTP server on loopback."""

from __future__ import annotations

import os
import socket

import pytest

pytest_plugins = ["tests.cluster"]  # the `ray_cluster` fixture of the cluster test tier

# Four logical CPUs on a 2-core machine: the stages of a pipeline (read, decode, model actor,
# postprocess, write) must be able to run at once, or a small test waits on scheduling.
LOCAL_RAY_CPUS = 4


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> str:
    """Seeded random U²-Net† weights: what tests of plumbing need (speed and shapes do not
    depend on training; tests that need a trained model use tests/fixtures/)."""
    import torch

    from u2net_core import build_model, save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "u2netp.pth"
    save_weights(build_model("u2netp"), path)
    return str(path)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=LOCAL_RAY_CPUS, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a real HTTP S3 API), with credentials in the environment
    so that every component (s3fs, pyarrow, boto3, Ray workers started later) finds it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port())
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name
