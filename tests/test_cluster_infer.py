"""The real 3-node test cluster itself: what `ray job submit` ships and runs, and that it
lives beside the embedded Ray (`ray_local`) other tests use in the same pytest process.

What the cluster tier relies on and unit tests on an embedded Ray cannot show: a job's code
arrives as an uploaded working_dir (only the repo's code: no .venv), storage credentials
arrive only through the job's runtime_env (the nodes have no AWS variables), and the driver
runs on the head node.
"""

from __future__ import annotations

import pytest

from tests.cluster import s3_env

pytestmark = pytest.mark.cluster


def test_submitted_entrypoint_runs_the_uploaded_code(ray_cluster, s3_server):
    """`ray job submit --working-dir <repo> -- python -m jobs.infer --help`: the cheapest job
    that exercises what every job of this tier relies on (the full runs, with faults, are in
    test_cluster_faults.py and test_cluster_train_reprocess.py)."""
    job = ray_cluster.submit(["--help"], s3_env(s3_server))
    info = job.succeeded()
    # `python` resolved to the venv's (PATH), which imported the job from the package.
    assert "usage: python -m jobs.infer" in job.logs()
    assert ray_cluster.node_of(info["driver_node_id"]).name == "head"

    # --working-dir shipped the repo's code and nothing heavy: .gitignore keeps .venv and
    # caches out, the submission excludes .git and the test fixtures' weights. Checked on
    # what the node actually unpacked.
    packages = ray_cluster.working_dir_packages()
    assert packages, "no working_dir package was unpacked on any node"
    for pkg in packages:
        files = [p for p in pkg.rglob("*") if p.is_file()]
        names = {p.relative_to(pkg).parts[0] for p in files}
        assert {"jobs", "pipeline", "u2net_core"} <= names, names
        assert not names & {".venv", ".git", ".pytest_cache"}, names
        assert not any("__pycache__" in p.parts or p.suffix == ".pth" for p in files)
        size = sum(p.stat().st_size for p in files)
        assert size < 5 * 2**20, f"working_dir package is {size / 2**20:.1f} MiB"

    # The nodes themselves have no storage settings: jobs get them from their runtime_env.
    for node in ray_cluster.nodes.values():
        with open(f"/proc/{node.pgid}/environ", "rb") as f:
            names = [item.split(b"=", 1)[0] for item in f.read().split(b"\0")]
        assert not [n for n in names if n.startswith(b"AWS_")], node.name


def test_cluster_coexists_with_embedded_ray(ray_local, ray_cluster):
    """The in-process `ray_local` Ray other tests use and this cluster are separate: neither
    joined the other, and both work while the other is up (whichever fixture started first)."""
    ray = ray_local

    @ray.remote(num_cpus=0.1)
    def node_id() -> str:
        return ray.get_runtime_context().get_node_id()

    local_node = ray.get(node_id.remote(), timeout=60)
    states = ray_cluster.node_states()  # also the record of a node killed by an earlier test
    assert {states[name]["state"] for name in ray_cluster.nodes} == {"ALIVE"}
    assert local_node not in {s["node_id"] for s in states.values()}
    assert ray.cluster_resources().get("CPU") == 4
    assert not any(k.startswith("u2r_") for k in ray.cluster_resources())
    assert sum(states[name]["resources_total"].get("CPU", 0) for name in ray_cluster.nodes) == 6
