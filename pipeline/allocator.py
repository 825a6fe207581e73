"""glibc malloc settings for the Ray processes that run U²-Net on CPU (model actors, training
workers), passed to them as a runtime_env.

U²-Net's activations are tens to hundreds of MB each (64 channels at full resolution, times the
batch), and Ray calls the model from a thread that is not the process's main thread (Ray Data's
actor wrapper, Ray Train's training thread). That thread's malloc arena hands every block over
64 MB to mmap, and back to the kernel on free, and trims the rest. So each forward pass faulted
in, and the kernel zeroed, 160–300 MB per image: 41,000–75,000 minor faults per image, a
fifth to a quarter of the CPU time spent in the kernel. One arena, no mmap and no trimming keep
the freed blocks for the next batch. Measured on machine A (BENCHMARKS.md, `bench/allocator.py`):
the model path in a worker thread 1.20× for U²-Net and 1.42× for U²-Net† (bf16, batch 8, two
1-thread processes); `jobs.infer` end to end 1.31×; Ray Train 1.74× (U²-Net†, fp32). The price
is memory: the peak working set stays mapped (0.2–0.5 GB more resident per inference process).

glibc reads these when the process starts, so they travel in the process's environment.
(Calling `mallopt` from inside the actor was not tried: by then Ray's own threads already
have arenas of their own.)
Other allocators (jemalloc, tcmalloc via LD_PRELOAD) ignore them. No settings for GPU
processes: their activations live on the device (not measured there).
"""

from __future__ import annotations

__all__ = ["CPU_MALLOC_ENV", "cpu_runtime_env"]

CPU_MALLOC_ENV: dict[str, str] = {
    "MALLOC_ARENA_MAX": "1",  # every thread in the main arena, where the two settings below hold
    "MALLOC_MMAP_MAX_": "0",  # no block from mmap, however large
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),  # never give the heap's top back to the kernel
}


def cpu_runtime_env() -> dict:
    """A runtime_env for a CPU process that runs the model. Ray merges it with the job's own
    runtime_env (env_vars are merged key by key), so `ray job submit --runtime-env-json` keeps
    working."""
    return {"env_vars": dict(CPU_MALLOC_ENV)}
