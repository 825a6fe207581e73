"""Memory flatness: peak RSS of a pack → infer run at two dataset sizes, side by side.

    python -m bench.memory_scaling --small 10000 --large 100000

Runs `bench.scale_run` once per size (each in its own process and its own local Ray, so no
peak carries over), then prints the peak RSS and the peak private memory of the driver, of
the largest Ray worker process and of all workers, and the RSS of Ray's own processes, per
stage, with the large/small ratio of each, and how much the driver's private memory grew
within the inference stage itself (what it held before stays resident), and per role
(model actor, read/decode/write task workers, Ray's own processes) the summed peaks of the
processes that played it.
Target (issue 7): within 10% (ratio ≤ 1.10) from 10k to 100k images. What must grow with the
dataset is said next to it: the driver holds the plan (one row per input) and reads the
tables' key columns back to reconcile them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

KEYS = ("tree_pss_sum", "driver_rss", "driver_private", "worker_rss_max", "worker_private_max",
        "workers_rss_sum", "workers_private_sum", "other_children_rss_sum")


def role_group(roles: list[str]) -> str:
    """What a process was in the stage, from the titles it was seen with: a model actor,
    one of Ray Data's own actors (by name), a task worker (Ray reuses one for read, decode,
    postprocess and write tasks, so they are one group), an idle worker, or one of Ray's own
    processes (by program)."""
    names = set()
    for role in roles:
        if role in ("ray::IDLE", "python default_worker.py", "?"):
            continue
        name = role.removeprefix("ray::")
        head, dot, tail = name.rpartition(".")
        if dot and tail.isidentifier() and (head.endswith(")") or head.isidentifier()):
            name = head  # "Actor.method" and "MapWorker(...).submit": the actor
        names.add(name)
    if any("U2NetPredictor" in n for n in names):
        return "model actors"
    actors = sorted(n for n in names
                    if n.startswith("MapWorker") or any(w in n for w in ("Actor", "Tracker", "Agent")))
    if actors:
        return "+".join(actors)
    if any(r.startswith("ray::") for r in roles):
        return "task workers" if names else "idle workers"
    return "+".join(sorted(names)) or "?"


def by_role(processes: list[dict]) -> dict[str, dict]:
    """Processes, private and PSS peaks summed per role group."""
    out: dict[str, dict] = {}
    for p in processes:
        g = out.setdefault(role_group(p["roles"]), {"processes": 0, "private_mib": 0.0, "pss_mib": 0.0})
        g["processes"] += 1
        g["private_mib"] = round(g["private_mib"] + p["private"], 1)
        g["pss_mib"] = round(g["pss_mib"] + p["pss"], 1)
    return out


def run_scale(images: int, workdir: Path, extra: list[str]) -> dict:
    report = workdir / f"scale_{images}.json"
    cmd = [sys.executable, "-m", "bench.scale_run", "--images", str(images),
           "--workdir", str(workdir / f"run_{images}"), "--report", str(report), *extra]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return json.loads(report.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--large", type=int, default=100_000)
    ap.add_argument("--workdir", default=str(REPO / ".bench_out" / "memory_scaling"))
    ap.add_argument("--report", default=str(REPO / ".bench_out" / "memory_scaling.json"))
    ap.add_argument("scale_args", nargs="*", help="passed to bench.scale_run (after --)")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    runs = {n: run_scale(n, work, args.scale_args) for n in (args.small, args.large)}
    small, large = (runs[args.small]["memory_mib"], runs[args.large]["memory_mib"])
    result = {"small": args.small, "large": args.large, "stages": {}}
    for stage in ("pack", "infer"):
        rows = {}
        for key in KEYS:
            a, b = small.get(stage, {}).get(key), large.get(stage, {}).get(key)
            if a and b:
                rows[key] = {"small_mib": a, "large_mib": b, "ratio": round(b / a, 3)}
        result["stages"][stage] = rows
    # The driver's growth within the inference stage: its peak over what it held at the start.
    result["infer_driver_private_growth_mib"] = {
        n: round(r["memory_mib"]["infer"]["driver_private"]
                 - r["stages"]["infer"]["driver_private_at_start_mib"], 1) for n, r in runs.items()}
    # Which processes grew: per role group, the sum of each process's peak in the inference
    # stage (peaks of different processes need not coincide, so these bound the tree's peak).
    roles = {n: by_role(r.get("processes_infer_mib", [])) for n, r in runs.items()}
    result["infer_by_role"] = {
        g: {"small": roles[args.small].get(g), "large": roles[args.large].get(g)}
        for g in sorted(set(roles[args.small]) | set(roles[args.large]))}
    result["infer_wall_s"] = {n: r["stages"]["infer"]["wall_s"] for n, r in runs.items()}
    result["reports"] = {n: str(work / f"scale_{n}.json") for n in runs}
    Path(args.report).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
