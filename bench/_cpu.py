"""CPU-seconds by process role while a block of code runs: this process and every process it
starts (a local Ray's raylet, GCS, agents and workers are its descendants).

Twice a second it reads every /proc/<pid>/stat once (parent and user + system time), keeps
the last value of each descendant; a process is named by the most specific role it was seen in (a worker that
ran a task is counted under that task's title, not `ray::IDLE`). Processes that ran before
the block started count only what they used inside it; one that exits counts up to its last
sample (at most half a second less).
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict

from bench.scale_run import _cmdline, _descendants, _proc_stat, _role

class CpuSampler:
    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.root = os.getpid()
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        stat = _proc_stat()
        parents = {pid: ppid for pid, (ppid, _) in stat.items()}
        for pid in [self.root, *_descendants(self.root, parents)]:
            if pid not in stat:
                continue
            cpu = stat[pid][1]
            self._start.setdefault(pid, cpu)
            self._last[pid] = cpu
            role = "this process" if pid == self.root else _role(_cmdline(pid))
            if role not in ("?", "ray::IDLE") or pid not in self._roles:
                self._roles[pid] = role

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "CpuSampler":
        self._sample()
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall_s = time.perf_counter() - self.t0

    def report(self) -> dict:
        by_role: dict[str, float] = defaultdict(float)
        for pid, last in self._last.items():
            by_role[self._roles.get(pid, "?")] += last - self._start[pid]
        roles = {k: round(v, 2) for k, v in sorted(by_role.items(), key=lambda kv: -kv[1]) if v >= 0.05}
        return {"wall_s": round(self.wall_s, 2), "cpu_s": round(sum(by_role.values()), 2),
                "cores": os.cpu_count(), "by_role": roles}
