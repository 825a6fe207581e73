"""A real multi-node Ray cluster on this host, and jobs submitted to it the way users do.

The `cluster` test tier (tests/test_cluster_*.py) needs what unit tests on an embedded Ray
cannot give: separate raylets (so a node can die), a dashboard that takes `ray job submit`,
jobs whose code arrives as an uploaded working_dir and whose storage credentials arrive only
through the job's runtime_env (the nodes' own environment has no AWS variables, as on a
cluster with no shared disk or shared config), and processes we can kill.

Layout (one session, started once in ~15-25 s on 2 cores):

    head  0 logical CPUs  GCS, dashboard, job drivers     resource {"u2r_head": 1}
    w1    3 logical CPUs  Ray Data tasks, model actors    resource {"u2r_w1": 1}
    w2    3 logical CPUs  Ray Data tasks, model actors    resource {"u2r_w2": 1}

The head takes no tasks or actors (as on production clusters): job entrypoints and Ray's
own 0-CPU actors run there, so killing a worker node always kills real work and never the
driver. Six logical CPUs on two cores is deliberate (DESIGN §5: logical CPUs are a budget):
model actors reserve 1 CPU each and Ray Data's read/decode/postprocess/write tasks need room
beside them, also on the one worker node left after a node is killed, or a job stalls
without an error. The custom `u2r_<name>` resources tell the nodes apart in the state API.

Every node is `ray start --block` in its own session (setsid: pid == process group id), with
its own private `--temp-dir`, its own ports (every one explicit, picked free in 20000–32000:
below the kernel's ephemeral range, where an embedded `ray.init()` such as the `ray_local`
fixture of the same pytest process takes all of its ports but the fixed 52365 and 8265, and
above the 10002–19999 a default `ray start` gives its workers), and the same token
auth (`RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN_PATH` to a token generated for this cluster,
never the user's `~/.ray/auth_token`). Every process a node starts inherits the marker
variables `U2R_CLUSTER`/`U2R_NODE`, so stopping finds exactly our processes — including
workers that left the node's process group — and never touches another Ray on the host
(no `ray stop`, which would kill every Ray on the machine).

The pytest process never connects to this cluster as a Ray driver (that would clash with the
embedded `ray_local` Ray of the same process): it submits with the `ray` CLI and reads job,
node and actor state from the dashboard's HTTP API with the bearer token.
"""

from __future__ import annotations

import io
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest

REPO = Path(__file__).resolve().parents[1]
# The interpreter running pytest is the venv's (make test runs .venv/bin/python -m pytest);
# its bin holds the `ray` executable and the `python` that job entrypoints must use.
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")

HEAD_CPUS, WORKER_CPUS = 0, 3
# Bounded object stores: three default-sized stores (30% of RAM each) would claim most of
# /dev/shm on a shared machine. 200 MB holds this tier's blocks (small images, 4.5 MB weights).
OBJECT_STORE_BYTES = 200 * 1024 * 1024
WORKER_PORTS_PER_NODE = 100  # concurrent worker processes per node, with headroom
PORT_RANGE = (20000, 32000)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}

# Every fixed synchronisation point polls with a deadline; these are the deadlines.
START_TIMEOUT_S = 90.0
JOB_TIMEOUT_S = 240.0


def poll(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Call `predicate` until it returns something truthy; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------- ports

class PortPicker:
    """Free TCP ports in PORT_RANGE, never the same one twice in this process.

    A port is free if it binds on all interfaces right now; there is a window between this
    check and Ray binding it, which is why the range avoids the kernel's ephemeral ports (the
    only ports other programs get without asking for a number).
    """

    def __init__(self) -> None:
        self.used: set[int] = set()
        self.rng = random.Random(os.getpid() ^ time.time_ns())

    @staticmethod
    def _free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
        return True

    def block(self, n: int) -> int:
        """First port of `n` consecutive free ports."""
        lo, hi = PORT_RANGE
        for _ in range(2000):
            base = self.rng.randrange(lo, hi - n)
            ports = range(base, base + n)
            if not self.used.intersection(ports) and all(self._free(p) for p in ports):
                self.used.update(ports)
                return base
        raise RuntimeError(f"no {n} consecutive free ports in {PORT_RANGE}")

    def one(self) -> int:
        return self.block(1)


# --------------------------------------------------------------------------------------- nodes

@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    ports: dict[str, int]
    num_cpus: int
    dead: bool = False  # killed on purpose: its exit is not an error

    @property
    def pgid(self) -> int:
        return self.proc.pid  # started with setsid: the node's process group is its pid


def _marked_pids(marker: str) -> list[int]:
    """Pids of live processes whose environment holds `marker` (e.g. `U2R_NODE=abc/w1`).

    Ray passes its own environment on to every worker, driver and agent a node starts, so
    this finds all of a node's processes, also those that moved to another process group.
    """
    needle = marker.encode() + b"\0"
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read() + b"\0"
        except OSError:  # gone, or not ours to read
            continue
        if b"\0" + needle in b"\0" + env:
            pids.append(int(entry))
    return pids


def reap_orphans() -> int:
    """Kill what a previous test session left behind (it was SIGKILLed, so its fixture never
    stopped its cluster): processes carrying our marker whose owning pytest is gone, then
    their temp dirs. Returns how many processes were killed. Never touches a live session's
    cluster (its owner is alive) nor any process without the marker."""
    stale: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        owner, cluster = env.get(b"U2R_OWNER"), env.get(b"U2R_CLUSTER")
        if owner and cluster and not os.path.exists(f"/proc/{int(owner)}"):
            stale[int(entry)] = env.get(b"RAY_AUTH_TOKEN_PATH", b"").decode()
    _kill_pids(stale)
    for token_path in set(stale.values()):
        root = Path(token_path).parent
        if root.name.startswith("u2r-") and root.parent == Path("/tmp"):
            shutil.rmtree(root, ignore_errors=True)
    return len(stale)


def _kill_pids(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class RayCluster:
    """Head + worker nodes as separate `ray start --block` process groups on this host."""

    def __init__(self, root: Path) -> None:
        self.id = secrets.token_hex(4)
        self.root = root
        self.ports = PortPicker()
        self.token = secrets.token_hex(32)
        self.token_path = root / "auth_token"
        self.token_path.write_text(self.token)
        self.token_path.chmod(0o600)
        self.nodes: dict[str, Node] = {}
        self.gcs_port = self.ports.one()
        self.dashboard_port = self.ports.one()
        self._serial = 0

    # -- environment -------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        """Environment for `ray` processes of this cluster (nodes and CLI calls).

        Starts from ours minus every RAY_* and AWS_* variable: the embedded Ray of this pytest
        process sets RAY_* ones, and storage credentials must reach jobs only through their
        runtime_env, as they would on a real cluster.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
        env.pop("PYTHONPATH", None)
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path),
                   RAY_USAGE_STATS_ENABLED="0", U2R_CLUSTER=self.id,
                   U2R_OWNER=str(os.getpid()))
        env.update(extra)
        return env

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    # -- nodes -------------------------------------------------------------------------------
    def _start_node(self, name: str, num_cpus: int, head: bool) -> Node:
        p = self.ports
        ports = {"node_manager": p.one(), "object_manager": p.one(), "metrics_export": p.one(),
                 "runtime_env_agent": p.one(), "dashboard_agent_listen": p.one(),
                 "dashboard_agent_grpc": p.one(), "min_worker": p.block(WORKER_PORTS_PER_NODE)}
        temp_dir = self.root / name
        # Each node also gets its own TMPDIR, as separate machines would: Python's tempfile
        # users (Ray Train's checkpoint downloads among them) must not meet across nodes in
        # the host's /tmp, and whatever they leave is removed with the cluster.
        (temp_dir / "tmp").mkdir(parents=True, exist_ok=True)
        cmd = [RAY, "start", "--block", "--disable-usage-stats", "--log-style=record",
               "--log-color=false",
               f"--num-cpus={num_cpus}", "--num-gpus=0",
               f"--object-store-memory={OBJECT_STORE_BYTES}",
               f"--resources={json.dumps({f'u2r_{name}': 1})}",
               f"--temp-dir={temp_dir}",
               f"--node-manager-port={ports['node_manager']}",
               f"--object-manager-port={ports['object_manager']}",
               f"--metrics-export-port={ports['metrics_export']}",
               f"--runtime-env-agent-port={ports['runtime_env_agent']}",
               f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
               f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
               f"--min-worker-port={ports['min_worker']}",
               f"--max-worker-port={ports['min_worker'] + WORKER_PORTS_PER_NODE - 1}"]
        if head:
            ports["client_server"] = p.one()
            cmd += ["--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                    f"--ray-client-server-port={ports['client_server']}"]
        else:
            cmd += [f"--address={self.gcs_address}"]
        log = self.root / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, cwd=self.root, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env=self.env(U2R_NODE=f"{self.id}/{name}",
                                                 TMPDIR=str(temp_dir / "tmp")))
        node = Node(name, proc, temp_dir, log, ports, num_cpus)
        self.nodes[name] = node
        return node

    def start(self) -> "RayCluster":
        self._start_node("head", HEAD_CPUS, head=True)
        # Workers can only register once the GCS listens: wait for the dashboard, which
        # comes up after it, instead of letting `ray start --address` retry blindly.
        poll(lambda: self._dashboard_up(), START_TIMEOUT_S, "the head node's dashboard")
        for name in ("w1", "w2"):
            self._start_node(name, WORKER_CPUS, head=False)
        self.wait_alive(["head", "w1", "w2"])
        return self

    def start_worker(self, wait: bool = True) -> Node:
        """Start a replacement worker node (a fresh name); by default wait until it is alive
        (`wait_alive([node.name])` later otherwise)."""
        self._serial += 1
        name = f"w{2 + self._serial}"
        node = self._start_node(name, WORKER_CPUS, head=False)
        if wait:
            self.wait_alive([name])
        return node

    def _dashboard_up(self) -> bool:
        self._check_processes()
        try:
            self.http("/api/version")
            return True
        except (OSError, urllib.error.URLError):
            return False

    def _check_processes(self) -> None:
        for node in self.nodes.values():
            if node.proc.poll() is not None and not node.dead:
                raise RuntimeError(f"ray node {node.name} exited with {node.proc.returncode}:\n"
                                   + node.log.read_text(errors="replace")[-3000:])

    def node_states(self) -> dict[str, dict]:
        """Our node name → the state API's record (the latest one per name)."""
        nodes = self.state("nodes")
        out: dict[str, dict] = {}
        for n in nodes:
            names = [k[4:] for k in (n.get("resources_total") or {}) if k.startswith("u2r_")]
            if names and (names[0] not in out or n.get("state") == "ALIVE"):
                out[names[0]] = n
        return out

    def wait_alive(self, names: list[str]) -> None:
        def ready():
            self._check_processes()
            try:
                states = self.node_states()
            except (OSError, urllib.error.URLError, RuntimeError):
                return False
            return all(states.get(n, {}).get("state") == "ALIVE" for n in names)
        poll(ready, START_TIMEOUT_S, f"nodes {names} to be ALIVE", interval=0.5)

    def node_of(self, node_id: str) -> Node | None:
        for name, rec in self.node_states().items():
            if rec.get("node_id") == node_id:
                return self.nodes.get(name)
        return None

    def kill_node(self, node: Node) -> None:
        """A machine dying: SIGKILL the node's process group and anything else it started.

        Returns once every one of its processes is gone. The GCS notices on its own (health
        checks, ~15 s); `wait_dead` waits for that."""
        node.dead = True
        try:
            os.killpg(node.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        marker = f"U2R_NODE={self.id}/{node.name}"
        _kill_pids(_marked_pids(marker))
        node.proc.wait(timeout=30)
        poll(lambda: not _marked_pids(marker), 30, f"node {node.name}'s processes to exit")
        del self.nodes[node.name]

    def wait_dead(self, name: str, timeout: float = 90) -> None:
        poll(lambda: self.node_states().get(name, {}).get("state") == "DEAD", timeout,
             f"the GCS to mark node {name} dead", interval=0.5)

    def stop(self) -> None:
        """Stop exactly what this cluster started: SIGKILL each node's process group, wait
        for it, then kill any straggler carrying our marker, then remove the temp dirs.

        SIGKILL, not SIGTERM: measured here, a SIGTERMed cluster takes 35–60 s to exit (the
        raylets keep retrying the dead GCS for up to a minute), and a throwaway cluster has
        nothing to flush: its session dirs are deleted with the temp dir and the object
        stores' shared memory is freed with the processes."""
        nodes = list(self.nodes.values())
        for node in nodes:
            node.dead = True
            try:
                os.killpg(node.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for node in nodes:
            node.proc.wait(timeout=30)
        marker = f"U2R_CLUSTER={self.id}"
        _kill_pids(_marked_pids(marker))
        poll(lambda: not _marked_pids(marker), 30, "the cluster's processes to exit")
        self.nodes.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- dashboard HTTP API ------------------------------------------------------------------
    def http(self, path: str, method: str = "GET", body: Any = None, timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.dashboard_url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def state(self, resource: str, **filters: str) -> list[dict]:
        """The state API (`ray list <resource>`), e.g. state("actors", state="ALIVE")."""
        q = "limit=10000&detail=true"
        for k, v in filters.items():
            q += f"&filter_keys={k}&filter_predicates=%3D&filter_values={v}"
        reply = self.http(f"/api/v0/{resource}?{q}")
        if not reply.get("result", True):
            raise RuntimeError(f"state API: {reply.get('msg')}")
        data = reply["data"]["result"]
        return data["result"] if isinstance(data, dict) else data

    def actors(self, name_part: str) -> list[dict]:
        """Alive actors whose class or repr name contains `name_part` (Ray Data names its pool
        actors MapWorker(MapBatches(U2NetPredictor)))."""
        return [a for a in self.state("actors", state="ALIVE")
                if name_part in (a.get("repr_name") or "") or name_part in (a.get("class_name") or "")]

    # -- jobs --------------------------------------------------------------------------------
    def submit(self, args: list[str], env_vars: dict[str, str], *, module: str = "jobs.infer",
               submission_id: str | None = None,
               excludes: tuple[str, ...] = (".git", "tests/fixtures")) -> "Job":
        """`ray job submit --no-wait` of `python -m <module> <args>`, exactly as a user types it.

        The repo is the working_dir: Ray uploads it, honouring .gitignore (so .venv, caches
        and outputs stay behind). Excluded here as well: `.git`, and the test fixtures'
        weight files (~10 MB of the ~11 MB the repo's files weigh), which no job reads.
        """
        sid = submission_id or f"{module.split('.')[-1]}-{secrets.token_hex(4)}"
        runtime_env = {"env_vars": env_vars, "excludes": list(excludes)}
        cmd = [RAY, "job", "submit", "--address", self.dashboard_url, "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps(runtime_env), "--submission-id", sid, "--no-wait",
               "--", "python", "-m", module, *args]
        proc = subprocess.run(cmd, cwd=self.root, env=self.env(), capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray job submit failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return Job(self, sid, proc.stdout + proc.stderr)

    def job_info(self, sid: str) -> dict:
        return self.http(f"/api/jobs/{sid}")

    def job_logs(self, sid: str) -> str:
        return self.http(f"/api/jobs/{sid}/logs").get("logs", "")

    def stop_job(self, sid: str) -> None:
        """What `ray job stop` does (the same dashboard endpoint), without the second it
        takes to start the CLI: a stop meant to land between two commits must be prompt.
        The job's supervisor sends SIGTERM to the driver, SIGKILL after a grace period."""
        reply = self.http(f"/api/jobs/{sid}/stop", method="POST", body={})
        if not reply.get("stopped"):
            raise RuntimeError(f"job {sid} was not running when asked to stop: {reply}")

    def working_dir_packages(self) -> list[Path]:
        """Unpacked working_dir packages on every node: what `--working-dir` really shipped."""
        return sorted(p for p in self.root.glob("*/session_*/runtime_resources/working_dir_files/*")
                      if p.is_dir())


@dataclass
class Job:
    cluster: RayCluster
    id: str
    submit_output: str
    _info: dict = field(default_factory=dict)

    def info(self) -> dict:
        self._info = self.cluster.job_info(self.id)
        return self._info

    @property
    def status(self) -> str:
        return self.info()["status"]

    def logs(self) -> str:
        return self.cluster.job_logs(self.id)

    def wait(self, timeout: float = JOB_TIMEOUT_S, statuses: Iterable[str] = TERMINAL) -> str:
        statuses = set(statuses)
        try:
            poll(lambda: self.status in statuses, timeout,
                 f"job {self.id} to reach {sorted(statuses)}", interval=1.0)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc} (it is {self._info.get('status')})\n--- logs (tail) ---\n"
                               f"{self.logs()[-6000:]}") from None
        return self._info["status"]

    def succeeded(self, timeout: float = JOB_TIMEOUT_S) -> dict:
        """Wait for the job; fail the test with its logs unless it SUCCEEDED."""
        status = self.wait(timeout)
        if status != "SUCCEEDED":
            raise AssertionError(f"job {self.id} ended {status}: {self._info.get('message')}\n"
                                 f"--- logs (tail) ---\n{self.logs()[-6000:]}")
        return self._info

    def stop(self) -> None:
        self.cluster.stop_job(self.id)

    def wait_until(self, predicate: Callable[[], Any], what: str,
                   timeout: float = JOB_TIMEOUT_S) -> Any:
        """Poll `predicate` while the job runs: the trigger for a mid-run fault. Fails at once
        (with the logs) if the job ends first, since a fault injected after the end of the
        run would prove nothing."""
        def check():
            value = predicate()
            if value:
                return value
            if self.status in TERMINAL:
                raise AssertionError(f"job {self.id} ended {self._info['status']} before {what}\n"
                                     f"--- logs (tail) ---\n{self.logs()[-6000:]}")
            return None
        return poll(check, timeout, what, interval=0.5)


# --------------------------------------------------------------------------------------- S3

def s3_env(endpoint: str) -> dict[str, str]:
    """What a job needs to reach the test object store: only through its runtime_env."""
    return {"AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
            "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1"}


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


def make_bucket(endpoint: str, name: str) -> str:
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


def list_keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    s3 = s3_client(endpoint)
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def read_table(endpoint: str, bucket: str, prefix: str, columns: list[str] | None = None):
    """Every Parquet file under a prefix, read with boto3 + pyarrow (not the code under test)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    s3 = s3_client(endpoint)
    parts = []
    for key in sorted(list_keys(endpoint, bucket, prefix)):
        if not key.endswith(".parquet") or key.rsplit("/", 1)[-1].startswith(("_", ".")):
            continue
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        parts.append(pq.read_table(io.BytesIO(body), columns=columns))
    return pa.concat_tables(parts) if parts else None


def mask_keys(endpoint: str, bucket: str, output_prefix: str) -> tuple[list[str], list[str]]:
    """(keys in masks/, keys in mask_errors/) of a batch-inference output, with repeats."""
    def keys(table):
        t = read_table(endpoint, bucket, f"{output_prefix}/{table}/", ["key"])
        return [] if t is None else t.column("key").to_pylist()
    return keys("masks"), keys("mask_errors")


def assert_every_key_once(endpoint: str, bucket: str, output_prefix: str, expected: Iterable[str],
                          expect_errors: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Nothing lost, nothing duplicated, nothing invented: every input key in exactly one row
    of exactly one of the two tables. With `expect_errors`, also which table each key is in."""
    expected = set(expected)
    masks, errors = mask_keys(endpoint, bucket, output_prefix)
    dup_m = sorted({k for k in masks if masks.count(k) > 1})
    dup_e = sorted({k for k in errors if errors.count(k) > 1})
    assert not dup_m, f"keys duplicated in masks: {dup_m[:10]}"
    assert not dup_e, f"keys duplicated in mask_errors: {dup_e[:10]}"
    both = set(masks) & set(errors)
    assert not both, f"keys in both tables: {sorted(both)[:10]}"
    got = set(masks) | set(errors)
    assert not expected - got, f"keys lost: {sorted(expected - got)[:10]} ({len(expected - got)})"
    assert not got - expected, f"keys invented: {sorted(got - expected)[:10]}"
    assert set(errors) == set(expect_errors), \
        f"unexpected error rows: {sorted(set(errors) ^ set(expect_errors))[:10]}"
    return masks, errors


def printed_json(logs: str, key: str) -> dict:
    """The last JSON object a job printed that has `key` (its summary). Ray interleaves the
    workers' forwarded log lines with the driver's output, so the summary is not
    necessarily the end of the logs."""
    decoder = json.JSONDecoder()
    found = None
    pos = 0
    while (pos := logs.find("{", pos)) != -1:
        if pos == 0 or logs[pos - 1] == "\n":
            try:
                obj, end = decoder.raw_decode(logs, pos)
            except ValueError:
                obj, end = None, pos + 1
            if isinstance(obj, dict) and key in obj:
                found = obj
            pos = max(end, pos + 1)
        else:
            pos += 1
    if found is None:
        raise AssertionError(f"no JSON with {key!r} in the job's output:\n{logs[-3000:]}")
    return found


def run_summary(endpoint: str, bucket: str, output_prefix: str) -> dict | None:
    s3 = s3_client(endpoint)
    try:
        body = s3.get_object(Bucket=bucket, Key=f"{output_prefix}/_run.json")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    return json.loads(body)


def put_images(endpoint: str, bucket: str, prefix: str, n: int, seed: int = 0,
               size: tuple[int, int] = (48, 40)) -> list[str]:
    """`n` small distinct PNGs (a bright box on noise) under `prefix`; returns their keys
    (paths relative to the prefix: the job's row keys). Two subfolders: a recursive listing."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    s3 = s3_client(endpoint)
    keys = []
    w, h = size
    for i in range(n):
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        x, y = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        arr[y:y + h // 2, x:x + w // 2] = 255
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        key = f"d{i % 2}/img{i:04d}.png"
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=buf.getvalue())
        keys.append(key)
    return keys


def put_weights(endpoint: str, bucket: str, key: str, model: str = "u2netp", seed: int = 0) -> str:
    """Deterministic random-init weights in S3 (the cluster has no shared disk to read from)."""
    import torch

    from u2net_core import build_model, save_weights

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pth"
        save_weights(build_model(model), path)
        s3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
    return f"s3://{bucket}/{key}"


# ------------------------------------------------------------------------------------ fixture

@pytest.fixture(scope="session")
def ray_cluster(request):
    """A 3-node Ray cluster (head with no CPUs, two 3-CPU workers), started once.

    Stopped right after the last test that uses it (see `pytest_runtest_teardown`), not at
    the end of the session: the tests after it should not share two cores with an idle
    cluster. The temp dir is short and directly under /tmp, not pytest's tmp_path: Ray puts
    Unix sockets in `<temp-dir>/session_<timestamp>/sockets/`, and pytest's deep tmp paths
    push those past the 107-byte socket path limit."""
    reap_orphans()
    for attempt in (1, 2):
        # A second attempt, on fresh ports, covers the one race a fixed layout has: a port
        # found free and taken by another program before Ray bound it.
        cluster = RayCluster(Path(tempfile.mkdtemp(prefix="u2r-", dir="/tmp")))
        try:
            cluster.start()
            break
        except (RuntimeError, TimeoutError, OSError) as exc:
            logs = "\n".join(f"--- {n.name} ---\n{n.log.read_text(errors='replace')[-2000:]}"
                             for n in cluster.nodes.values() if n.log.exists())
            cluster.stop()
            if attempt == 2:
                raise RuntimeError(f"could not start the test cluster: {exc}\n{logs}") from exc
        except BaseException:
            cluster.stop()
            raise
    request.config.stash[_CLUSTER] = cluster
    yield cluster
    cluster.stop()


_CLUSTER = pytest.StashKey[RayCluster]()
_LAST_USER = pytest.StashKey[str]()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items) -> None:
    users = [item.nodeid for item in items if "ray_cluster" in getattr(item, "fixturenames", ())]
    if users:
        config.stash[_LAST_USER] = users[-1]


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem) -> None:
    if item.nodeid == item.config.stash.get(_LAST_USER, None):
        cluster = item.config.stash.get(_CLUSTER, None)
        if cluster is not None:
            cluster.stop()  # idempotent: the fixture's own teardown finds nothing left
