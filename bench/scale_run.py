"""Scale run: generate N small JPEGs, list, plan, pack them into shards, run inference on the
shards; record wall time per stage, peak memory of the driver and the Ray processes, listing
and planning costs, and the files written. Writes a JSON report (input to bench/cost_model.py).

    python -m bench.scale_run --images 100000 --infer-images 2000

The model stage on CPU dominates a run on a small machine (u2netp at 64 px runs ~5–20
images/s on 2 cores), so `--infer-images` runs inference on the first shards only (hard links
into a separate folder: the same bytes, no copy) while every other stage handles all N.
The report says which numbers cover how many images.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/scale_run.py` as well as `python -m bench.scale_run`
    sys.path.insert(0, str(REPO))

from bench._machine import machine_info  # noqa: E402  (after the path set-up)

FILES_PER_DIR = 1000  # a realistic prefix layout, and directories of a sane size


# ---------------------------------------------------------------------------------------------
# Memory sampling from /proc (psutil is not a dependency)

def _memory_bytes(pid: int) -> tuple[int, int, int]:
    """(resident, private, shared-memory) bytes of a process: VmRSS; RssAnon, its anonymous
    memory alone; RssShmem, the shared-memory pages it has touched (the object store's
    /dev/shm file among them). VmRSS counts those shared pages too, in every process that
    touched them: the object store grows with the run, not with the process."""
    values = {"VmRSS:": 0, "RssAnon:": 0, "RssShmem:": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in values:
                    values[parts[0]] = int(parts[1]) * 1024
    except OSError:
        pass
    return values["VmRSS:"], values["RssAnon:"], values["RssShmem:"]


def _pss_bytes(pid: int) -> int:
    """Proportional set size: private pages plus each shared page divided by the number of
    processes mapping it. Summed over a process tree it counts the object store's shared
    memory and torch's libraries once: the tree's real share of the machine's memory."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _role(cmdline: str) -> str:
    """What a process is, from its command line: a Ray worker's title names its task or
    actor ("ray::MapWorker(MapBatches(decode_batch)->...)", "ray::IDLE"); Ray's own processes
    are named by their program (raylet, gcs_server, the agents' scripts)."""
    if cmdline.startswith("ray::"):
        return cmdline.split(" ", 1)[0]
    words = cmdline.split()
    if not words:
        return "?"
    prog = words[0].rsplit("/", 1)[-1]
    if prog.startswith("python"):  # python -u .../log_monitor.py, python -m x
        args = [w for w in words[1:] if w == "-m" or not w.startswith("-")]
        if args[:1] == ["-m"]:
            args = args[1:]
        return f"python {args[0].rsplit('/', 1)[-1]}" if args else prog
    return prog


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_stat() -> dict[int, tuple[int, float]]:
    """Every process's parent pid and CPU-seconds (utime + stime), from one read of its stat."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # the command may contain spaces and parentheses: split after the last ")"
                    fields = f.read().rsplit(")", 1)[1].split()
                found[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
            except (OSError, IndexError, ValueError):
                continue
    return found


def _parent_map() -> dict[int, int]:
    return {pid: ppid for pid, (ppid, _) in _proc_stat().items()}


def _descendants(root: int, parents: dict[int, int]) -> list[int]:
    """Every process below `root` in a `_parent_map`, not `root` itself."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = [], list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


class MemorySampler:
    """Samples memory twice a second: the driver, this run's Ray worker processes (`ray::…`)
    and this run's other Ray processes (raylet, GCS, agents), with the peaks kept per stage.
    Only descendants of this process count: other Ray clusters on the host are not ours.

    Two measures per process: RSS, which counts shared pages (the object store's mapped
    memory, torch's libraries) in every process that maps them, so its sums are upper bounds;
    and private (anonymous) memory, which is the process's own heap: what grows if something
    in it keeps per-row state. The object store itself is sized by Ray, not by the data.
    And one for the whole tree (driver, workers, Ray's processes): the sum of PSS, which
    counts each shared page once, split between its users."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.stage = "setup"
        self.peaks: dict[str, dict[str, int]] = {}
        # Per process and stage: peak private, PSS and shared-memory bytes, and every role it
        # was seen in (a Ray worker takes the title of whatever task it runs): so what grows
        # can be told apart by role, not only in the sums.
        self.processes: dict[str, dict[int, dict]] = {}
        # The process whose tree is measured and which counts as the driver: this one, or
        # the job's own process when inference runs as `python -m jobs.infer` (--job-process).
        self.root = os.getpid()
        # (seconds since start, stage, driver private, workers' private sum, tree PSS in MiB,
        # Ray worker processes): whether something grows steadily through a stage, jumps at
        # its end, or comes with extra processes.
        self.timeline: list[tuple] = []
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        me = self.root
        driver_rss, driver_private, _ = _memory_bytes(me)
        values = {"driver_rss": driver_rss, "driver_private": driver_private,
                  "workers_rss_sum": 0, "worker_rss_max": 0, "workers_private_sum": 0,
                  "worker_private_max": 0, "other_children_rss_sum": 0, "worker_processes": 0,
                  "tree_pss_sum": _pss_bytes(me)}
        procs = self.processes.setdefault(self.stage, {})
        for pid in _descendants(me, _parent_map()):
            rss, private, shmem = _memory_bytes(pid)
            pss, cmdline = _pss_bytes(pid), _cmdline(pid)
            values["tree_pss_sum"] += pss
            rec = procs.setdefault(pid, {"roles": [], "private": 0, "pss": 0, "shmem": 0})
            role = _role(cmdline)
            if role not in rec["roles"]:
                rec["roles"].append(role)
            rec["private"] = max(rec["private"], private)
            rec["pss"] = max(rec["pss"], pss)
            rec["shmem"] = max(rec["shmem"], shmem)
            if cmdline.startswith("ray::"):
                values["workers_rss_sum"] += rss
                values["worker_rss_max"] = max(values["worker_rss_max"], rss)
                values["workers_private_sum"] += private
                values["worker_private_max"] = max(values["worker_private_max"], private)
                values["worker_processes"] += 1
            else:  # raylet, gcs_server, agents, idle workers, the image generator's processes
                values["other_children_rss_sum"] += rss
        self.timeline.append((round(time.monotonic() - self._t0, 1), self.stage,
                              *(round(values[k] / 2**20, 1) for k in
                                ("driver_private", "workers_private_sum", "tree_pss_sum")),
                              values["worker_processes"]))
        p = self.peaks.setdefault(self.stage, {})
        for key, value in values.items():
            p[key] = max(p.get(key, 0), value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        return {stage: {k: (round(v / 2**20, 1) if k != "worker_processes" else v)
                        for k, v in p.items()} for stage, p in self.peaks.items()}

    def process_report(self, stage: str) -> list[dict]:
        """Each process seen in `stage`, largest PSS first: its roles and peaks in MiB
        (the peaks of different processes need not coincide in time)."""
        rows = [{"pid": pid, "roles": rec["roles"],
                 **{k: round(rec[k] / 2**20, 1) for k in ("private", "pss", "shmem")}}
                for pid, rec in self.processes.get(stage, {}).items()]
        return sorted(rows, key=lambda r: -r["pss"])


# ---------------------------------------------------------------------------------------------
# Stages

def _write_images(args: tuple[str, int, int, int, int]) -> int:
    """One worker process: images [start, stop) into `root`; returns bytes written."""
    root, start, stop, size, seed = args
    from PIL import Image

    rng = np.random.default_rng(seed + start)
    yy, xx = np.mgrid[0:size, 0:size]
    written = 0
    for i in range(start, stop):
        # A smooth background and a bright blob at a random place: cheap to make, JPEG-sized
        # like a small real picture (~1–2 KB at 64 px), and every image different.
        cx, cy, r = rng.integers(8, size - 8, 2).tolist() + [int(rng.integers(5, size // 3))]
        base = rng.integers(0, 160, 3)
        img = np.empty((size, size, 3), np.uint8)
        img[:] = (base + (xx[..., None] * rng.integers(0, 2, 3)) // 2).clip(0, 255).astype(np.uint8)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(180, 256, 3)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        d = Path(root) / f"d{i // FILES_PER_DIR:05d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i:08d}.jpg").write_bytes(buf.getvalue())
        written += len(buf.getvalue())
    return written


def generate(root: Path, n: int, size: int, workers: int, seed: int = 0) -> dict:
    chunk = 2000
    jobs = [(str(root), s, min(n, s + chunk), size, seed) for s in range(0, n, chunk)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        total = sum(pool.map(_write_images, jobs))
    return {"images": n, "bytes": total, "mean_bytes": round(total / max(n, 1), 1),
            "size_px": size}


def _tree_stats(root: Path, groups: dict[str, str]) -> dict:
    """Files and bytes under `root`, grouped by the first matching path prefix."""
    out: dict[str, dict] = {}
    for p in root.rglob("*"):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        group = next((g for prefix, g in groups.items() if rel.startswith(prefix)), "other")
        s = out.setdefault(group, {"files": 0, "bytes": 0})
        s["files"] += 1
        s["bytes"] += p.stat().st_size
    return out


def _link_first_shards(packed: Path, dest: Path, images: int, shard_size: int) -> int:
    """Hard-link the first shards holding `images` images into `dest` (same bytes, no copy)."""
    dest.mkdir(parents=True, exist_ok=True)
    shards = sorted(p for p in packed.iterdir() if p.name.startswith("shard-"))
    wanted = shards[: max(1, -(-images // shard_size))]
    for p in wanted:
        target = dest / p.name
        if not target.exists():
            os.link(p, target)
    return len(wanted)


def _infer_in_own_process(mcfg, masks_out: Path, timed, mem: MemorySampler) -> dict:
    """`python -m jobs.infer` on the same inputs as a child process: the sampler follows that
    process's tree for the stage (its driver is the job's). Returns the job's run summary."""
    import subprocess

    cmd = [sys.executable, "-m", "jobs.infer", "--input", mcfg.source.uri, "--source", mcfg.source.kind,
           "--output", str(masks_out), "--model", mcfg.model.name, "--weights", mcfg.model.weights,
           "--input-size", str(mcfg.model.input_size)]
    print("+", " ".join(cmd), flush=True)
    with timed():
        proc = subprocess.Popen(cmd, cwd=REPO)
        mem.root = proc.pid
        try:
            rc = proc.wait()
        finally:
            mem.sample()  # the job's tree may be gone; the peaks so far stay
            # From here the sampler measures this process again: not in the job's stage.
            mem.stage = "after_infer"
            mem.root = os.getpid()
    if rc != 0:
        raise SystemExit(f"jobs.infer exited with {rc}")
    return json.loads((masks_out / "_run.json").read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000, help="images to generate and pack")
    ap.add_argument("--infer-images", type=int, default=None,
                    help="run inference on the first shards holding this many images (default: all)")
    ap.add_argument("--image-size", type=int, default=64, help="generated image side in pixels")
    ap.add_argument("--input-size", type=int, default=64, help="model input size for inference")
    ap.add_argument("--model", default="u2netp", choices=["u2net", "u2netp"])
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--format", default="webdataset", choices=["webdataset", "parquet"])
    ap.add_argument("--num-cpus", type=int, default=4,
                    help="logical CPUs of the local Ray (more than cores, so every stage can run; DESIGN §5)")
    ap.add_argument("--workdir", default=str(REPO / ".bench_out" / "scale"),
                    help="where images, shards and outputs go (deleted first unless --keep-images)")
    ap.add_argument("--keep-images", action="store_true", help="reuse images already generated in --workdir")
    ap.add_argument("--report", default=str(REPO / ".bench_out" / "scale_run.json"))
    ap.add_argument("--job-process", action="store_true",
                    help="run inference as `python -m jobs.infer` in a process of its own, with its "
                         "own local Ray, and measure that process tree alone: nothing the benchmark "
                         "held before is in its numbers")
    args = ap.parse_args(argv)

    import logging

    import ray
    import torch

    from pipeline import storage
    from pipeline.batch import run_batch_inference
    from pipeline.config import DecodeConfig, MaskPipelineConfig, ModelConfig, SourceConfig
    from pipeline.manifest import plan_manifest
    from pipeline.pack import PackConfig, run_pack
    from pipeline.sources import plan_source
    from u2net_core import build_model, save_weights

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    work = Path(args.workdir)
    images_dir, packed, subset = work / "images", work / "packed", work / "infer_input"
    masks_out = work / "masks_run"
    if not args.keep_images and work.exists():
        shutil.rmtree(work)
    for d in (packed, subset, masks_out):
        shutil.rmtree(d, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    report: dict = {"started_at": datetime.now(timezone.utc).isoformat(),
                    "command": " ".join([sys.executable.rsplit("/", 1)[-1], "-m", "bench.scale_run",
                                         *(argv if argv is not None else sys.argv[1:])]),
                    "machine": machine_info(), "load_average_start": os.getloadavg(),
                    "params": vars(args), "stages": {}}
    stages = report["stages"]

    def timed(name: str, sampler: MemorySampler):
        class _T:
            def __enter__(self):
                sampler.stage = name
                # What the driver holds as the stage starts: the stage's own growth is its
                # peak minus this (earlier stages' state stays resident).
                stages.setdefault(name, {})["driver_private_at_start_mib"] = round(
                    _memory_bytes(os.getpid())[1] / 2**20, 1)
                self.t0 = time.perf_counter()
                return self

            def __exit__(self, *exc):
                stages.setdefault(name, {})["wall_s"] = round(time.perf_counter() - self.t0, 3)
                sampler.sample()
        return _T()

    with MemorySampler() as mem:
        with timed("generate", mem):
            if args.keep_images and images_dir.exists():
                n_have = sum(1 for _ in images_dir.rglob("*.jpg"))
                if n_have != args.images:
                    raise SystemExit(f"--keep-images: {images_dir} holds {n_have} images, not {args.images}")
                stages["generate"].update(reused=True, images=n_have)
            else:
                stages["generate"].update(generate(images_dir, args.images, args.image_size,
                                                   workers=os.cpu_count() or 1))

        with timed("list", mem):
            entries = storage.list_files(str(images_dir))
        stages["list"].update(objects=len(entries),
                              us_per_object=round(stages["list"]["wall_s"] / len(entries) * 1e6, 2))

        source = SourceConfig(uri=str(images_dir), kind="files")
        with timed("plan", mem):
            plan = plan_source(source)  # lists again: the plan is listing + unit table
        units = plan.units
        stages["plan"].update(units=units.num_rows, unit_table_bytes=units.nbytes,
                              bytes_per_unit=round(units.nbytes / units.num_rows, 1),
                              us_per_unit=round(stages["plan"]["wall_s"] / units.num_rows * 1e6, 2))

        # The same inputs as a manifest: planning without a listing.
        import pyarrow as pa
        import pyarrow.parquet as pq

        manifest = work / "manifest.parquet"
        pq.write_table(pa.table({"key": units.column("key"), "uri": units.column("unit_uri")}), manifest)
        with timed("plan_manifest", mem):
            mplan = plan_manifest(SourceConfig(uri=str(manifest), kind="manifest"))
        per_unit = stages["plan_manifest"]["wall_s"] / mplan.units.num_rows
        stages["plan_manifest"].update(units=mplan.units.num_rows, manifest_bytes=manifest.stat().st_size,
                                       us_per_unit=round(per_unit * 1e6, 2))
        del mplan

        with timed("ray_init", mem):
            ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        try:
            cfg = PackConfig(output=str(packed), format=args.format, shard_size=args.shard_size)
            with timed("pack", mem):
                summary = run_pack(source, cfg, plan=plan)
            stages["pack"].update({k: summary[k] for k in ("inputs", "packed", "errors", "shards",
                                                             "shard_bytes", "image_bytes")})
            stages["pack"]["timings"] = summary["timings"]
            stages["pack"]["images_per_s"] = round(summary["inputs"] / stages["pack"]["wall_s"], 1)
            # Wall time inside the shard tasks, per image: tasks overlap on shared cores, so
            # these are not CPU costs. The core time per image is bounded by wall × cores / N.
            stages["pack"]["task_wall_ms_per_image"] = {
                k: round(v / summary["inputs"] * 1e3, 4) for k, v in summary["timings"]["task_seconds"].items()}
            stages["pack"]["core_ms_per_image_upper_bound"] = round(
                stages["pack"]["wall_s"] * (os.cpu_count() or 1) / summary["inputs"] * 1e3, 4)
            stages["pack"]["files"] = _tree_stats(packed, {"shard-": "shards", "_index/": "index_pieces",
                                                           "_done/": "done_markers", "_index.parquet": "index",
                                                           "_pack.json": "summary"})

            with timed("repack_verify", mem):  # a rerun: every shard re-hashed and skipped
                again = run_pack(source, cfg, plan=plan)
            stages["repack_verify"].update(shards_skipped=again["shards_skipped"],
                                           shards_written=again["shards_written"])

            n_infer = min(args.images, args.infer_images or args.images)
            infer_input = packed
            if n_infer < args.images:
                used = _link_first_shards(packed, subset, n_infer, args.shard_size)
                infer_input = subset
                n_infer = min(args.images, used * args.shard_size)
            # The benchmark's own listing and plans are not the inference job's: let them go,
            # so the driver's peak in the infer stage is closer to the job's own.
            del entries, units, plan
            gc.collect()
            torch.manual_seed(0)
            weights = work / f"{args.model}.pth"
            save_weights(build_model(args.model), weights)  # untrained: the cost is the same
            mcfg = MaskPipelineConfig(
                source=SourceConfig(uri=str(infer_input),
                                    kind="webdataset" if args.format == "webdataset" else "parquet"),
                model=ModelConfig(name=args.model, weights=str(weights), input_size=args.input_size),
                decode=DecodeConfig(input_size=args.input_size))
            if args.job_process:
                ray.shutdown()  # the job starts its own local Ray, sized as a user's would be
                s = _infer_in_own_process(mcfg, masks_out, lambda: timed("infer", mem), mem)
                stages["infer"]["driver_private_at_start_mib"] = 0.0  # the job's process began with the stage
            else:
                with timed("infer", mem):
                    s = run_batch_inference(mcfg, str(masks_out), local_cores=os.cpu_count())
            stages["infer"].update(images=n_infer, masks=s["masks"], errors=s["errors"],
                                   actors=s["actors"], timings=s["timings"],
                                   images_per_s=round(n_infer / stages["infer"]["wall_s"], 2),
                                   files=_tree_stats(masks_out, {"masks/": "masks", "mask_errors/": "mask_errors",
                                                                 "_run.json": "summary"}))
            mb = stages["infer"]["files"].get("masks", {}).get("bytes", 0)
            stages["infer"]["masks_bytes_per_row"] = round(mb / max(s["masks"], 1), 1)
        finally:
            ray.shutdown()

    report["memory_mib"] = mem.report()
    report["processes_infer_mib"] = mem.process_report("infer")
    report["memory_timeline"] = {"columns": ["t_s", "stage", "driver_private_mib",
                                             "workers_private_sum_mib", "tree_pss_mib",
                                             "worker_processes"],
                                 "rows": mem.timeline}
    report["load_average_end"] = os.getloadavg()
    report["finished_at"] = datetime.now(timezone.utc).isoformat()
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk in ("wall_s", "images_per_s", "us_per_object",
                                                                   "us_per_unit", "images")}
                      for k, v in stages.items()}, indent=1))
    print(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
