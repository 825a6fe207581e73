"""What every benchmark report records about the machine it ran on (one function, for all)."""

from __future__ import annotations

import os
import platform


def _first(path: str, prefix: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine_info() -> dict:
    """CPU model and features that change the numbers, memory, load, and library versions."""
    import pyarrow
    import ray
    import torch

    from u2net_core.runtime import cpu_has_native_bf16

    mem_kib = _first("/proc/meminfo", "MemTotal").split()
    info = {
        "cpu": _first("/proc/cpuinfo", "model name"),
        "cpu_native_bf16": cpu_has_native_bf16(),  # AMX / AVX512-BF16: what `auto` runs at
        "logical_cpus": os.cpu_count(),
        "mem_gib": round(int(mem_kib[0]) / 2**20, 1) if mem_kib else None,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
