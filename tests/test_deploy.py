"""deploy/: every manifest parses, and every command it runs is a real command of ours.

The entrypoints are checked with the jobs' own argparse parser (`jobs.cli.build_parser`) after
the shell expansions a pod would do: RayJob/RayCronJob entrypoints with the ConfigMap values
KubeRay's submitter pod gets; the shell scripts (deploy/submit_nightly.sh and the CronJob's bash) are really
run, with a stub `ray` on PATH that records what it was asked to do, and the recorded
`ray job submit` arguments are parsed with Ray's own click command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_docs() -> list[dict]:
    return [d for path in MANIFESTS for d in _docs(path)]


def _parse_job_command(argv: list[str]):
    """`python -m jobs.X ...` or `u2net-ray X ...` → the parsed arguments of that job."""
    from jobs import cli

    modules = {module: name for name, (module, _) in cli.COMMANDS.items()}
    if argv[:2] == ["python", "-m"] or argv[:2] == ["python3", "-m"]:
        assert argv[2] in modules, f"{argv[2]} is not a job module"
        command, flags = modules[argv[2]], argv[3:]
    else:
        assert argv[0] == "u2net-ray", argv
        command, flags = argv[1], argv[2:]
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    # Manifests outlive flag renames: spell flags out, no argparse prefix matching.
    sub.choices[command].allow_abbrev = False
    try:
        return parser.parse_args([command, *flags])
    except SystemExit:
        pytest.fail(f"invalid flags for {command}: {shlex.join(flags)}")


def _expand(entrypoint: str, env: dict[str, str]) -> list[str]:
    """What the shell running an entrypoint makes of it (variables from the pod's env)."""
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", entrypoint))
    missing = used - set(env)
    assert not missing, f"entrypoint uses variables its pod does not get: {sorted(missing)}"
    return [re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env[m.group(1)], tok)
            for tok in shlex.split(entrypoint)]


def test_every_manifest_parses_and_names_what_it_is():
    assert {p.name for p in MANIFESTS} >= {"rayjob-nightly.yaml", "raycronjob-nightly.yaml",
                                           "cronjob-submit.yaml"}
    kinds = {}
    for path in MANIFESTS:
        for d in _docs(path):
            assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), path
            kinds.setdefault(d["kind"], []).append(path.name)
    assert kinds["RayJob"] == ["rayjob-nightly.yaml"]
    assert kinds["RayCronJob"] == ["raycronjob-nightly.yaml"]
    assert kinds["CronJob"] == ["cronjob-submit.yaml"]
    text = (DEPLOY / "raycronjob-nightly.yaml").read_text()
    assert "1.6" in text and "alpha" in text.lower() and "RayCronJob=true" in text


def _rayjob_specs():
    for d in _all_docs():
        if d["kind"] == "RayJob":
            yield "RayJob", d["spec"]
        elif d["kind"] == "RayCronJob":
            assert d["spec"]["schedule"].count(" ") == 4  # five cron fields
            yield "RayCronJob", d["spec"]["jobTemplate"]


@pytest.mark.parametrize("kind", ["RayJob", "RayCronJob"])
def test_kuberay_entrypoints_are_valid_reprocess_commands(kind):
    specs = [spec for k, spec in _rayjob_specs() if k == kind]
    assert specs
    for spec in specs:
        # KubeRay's submitter pod runs `ray job submit ... -- <entrypoint>` through bash, so the
        # entrypoint's variables must be in that pod's environment.
        (submitter,) = spec["submitterPodTemplate"]["spec"]["containers"][:1]
        env = _pod_env(submitter)
        args = _parse_job_command(_expand(spec["entrypoint"], env))
        assert args.command == "reprocess"
        assert args.warehouse == env["WAREHOUSE"] and args.input == env["INPUT_URI"]
        assert args.weights == env["WEIGHTS_URI"] and args.catalog_uri == env["CATALOG_URI"]
        cluster = spec["rayClusterSpec"]
        images = {c["image"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
                  for c in g["template"]["spec"]["containers"]}
        assert len(images) == 1  # head and workers run the same code
        # The default catalog is a SQLite file on the head pod (where the driver runs): the
        # path must be on a volume mounted there.
        if env["CATALOG_URI"].startswith("sqlite:///"):
            mounts = [m["mountPath"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]
                      for m in c.get("volumeMounts", [])]
            db = env["CATALOG_URI"][len("sqlite:///"):]
            assert any(db.startswith(m.rstrip("/") + "/") for m in mounts), (db, mounts)


# ---------------------------------------------------------------------------------------------
# shell: run the scripts with a stub `ray`

_STUB = """#!{python}
import json, os, sys
log = os.environ["RAY_STUB_LOG"]
with open(log, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if args[:2] == ["job", "status"]:
    if os.environ.get("RAY_STUB_EXISTING") == "1":
        print("Status for job: " + os.environ.get("RAY_STUB_STATUS", "SUCCEEDED"))
        sys.exit(0)
    print("job not found", file=sys.stderr)
    sys.exit(1)
sys.exit(0)
"""


@pytest.fixture
def stub_ray(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    ray = bindir / "ray"
    ray.write_text(_STUB.format(python=sys.executable))
    ray.chmod(ray.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "ray-calls.jsonl"
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "RAY_STUB_LOG": str(log),
           "HOME": str(tmp_path)}

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return env, calls


def _check_submit(argv: list[str]):
    """A `ray job submit ...` argv: valid for Ray's CLI, and its entrypoint valid for ours."""
    from ray.dashboard.modules.job.cli import submit

    assert argv[:2] == ["job", "submit"], argv
    ctx = submit.make_context("submit", argv[2:])
    entrypoint = list(ctx.params["entrypoint"])
    args = _parse_job_command(entrypoint)
    assert args.command == "reprocess"
    return ctx.params, args


def test_submit_script_submits_a_valid_job(stub_ray, tmp_path):
    env, calls = stub_ray
    job_env = {"RAY_ADDRESS": "http://head:8265", "INPUT_URI": "s3://b/images/",
               "WAREHOUSE": "s3://b/wh", "CATALOG_URI": "sqlite:////var/lib/u2net/catalog.db",
               "WEIGHTS_URI": "s3://b/u2net.pth", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    out = subprocess.run(["bash", str(DEPLOY / "submit_nightly.sh"), "--full"], cwd=tmp_path,
                         env={**env, **job_env}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (submit,) = calls()
    params, args = _check_submit(submit)
    assert params["address"] == "http://head:8265"
    assert params["submission_id"].startswith("u2net-nightly-")
    assert (args.input, args.warehouse, args.weights, args.full, args.prune) == (
        "s3://b/images/", "s3://b/wh", "s3://b/u2net.pth", True, True)
    assert args.summary == f"s3://b/wh/_runs/{params['submission_id']}.json"
    runtime_env = json.loads(params["runtime_env_json"])
    assert runtime_env["working_dir"] == "." and ".venv" in runtime_env["excludes"]
    assert "AWS_SECRET_ACCESS_KEY" not in runtime_env["env_vars"]  # not forwarded unless asked

    out = subprocess.run(["bash", str(DEPLOY / "submit_nightly.sh")], cwd=tmp_path,
                         env={**env, **job_env, "FORWARD_AWS_ENV": "1"}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    params, _ = _check_submit(calls()[-1])
    assert json.loads(params["runtime_env_json"])["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"

    missing = subprocess.run(["bash", str(DEPLOY / "submit_nightly.sh")], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "RAY_ADDRESS" in missing.stderr


def _cronjob_container() -> dict:
    (cron,) = [d for d in _all_docs() if d["kind"] == "CronJob"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return container


def _pod_env(container: dict) -> dict[str, str]:
    """The plain values a container gets from `env` and from ConfigMaps defined under deploy/."""
    maps = {d["metadata"]["name"]: d["data"] for d in _all_docs() if d["kind"] == "ConfigMap"}
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update({k: str(v) for k, v in maps[source["configMapRef"]["name"]].items()})
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def test_cronjob_submits_once_per_night(stub_ray, tmp_path):
    env, calls = stub_ray
    container = _cronjob_container()
    command = [*container["command"], *container.get("args", [])]
    pod_env = {**env, **_pod_env(container)}
    out = subprocess.run(command, cwd=tmp_path, env=pod_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    status, submit = calls()
    assert status[:2] == ["job", "status"]
    params, args = _check_submit(submit)
    assert params["address"] == pod_env["RAY_ADDRESS"]
    assert re.fullmatch(r"u2net-nightly-\d{8}", params["submission_id"])
    assert args.input == pod_env["INPUT_URI"] and args.warehouse == pod_env["WAREHOUSE"]

    # A retried pod finds tonight's job and follows it instead of submitting a second one.
    for final, rc in (("SUCCEEDED", 0), ("FAILED", 1)):
        before = len(calls())
        out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                             env={**pod_env, "RAY_STUB_EXISTING": "1", "RAY_STUB_STATUS": final})
        assert out.returncode == rc, (final, out.stderr)
        verbs = [c[:2] for c in calls()[before:]]
        assert ["job", "submit"] not in verbs and ["job", "logs"] in verbs
