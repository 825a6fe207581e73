"""The model stage: placement chosen from the cluster's resources (GPU rules included, on CPU),
and the predictor's batching loop against the model called one image at a time."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.allocator import CPU_MALLOC_ENV
from pipeline.predict import (U2NetPredictor, default_batch_size, initial_actors, model_remote_args,
                              plan_actors)
from u2net_core import build_model, load_weights, normalize, probabilities, to_uint8_map


@pytest.mark.parametrize("cluster,kwargs,expected", [
    # A GPU cluster: one actor per GPU, 1 CPU each, a batch that fills the card.
    ({"CPU": 32, "GPU": 4}, {}, ("cuda", 4, 1.0, 1.0, 64)),
    # Two actors share each GPU.
    ({"CPU": 32, "GPU": 4}, {"gpus_per_actor": 0.5}, ("cuda", 8, 0.5, 1.0, 64)),
    # CPU only, small: 1-CPU actors on 3/4 of the CPUs.
    ({"CPU": 2}, {}, ("cpu", 1, 0.0, 1.0, 8)),
    # CPU only, large: 4-CPU actors.
    ({"CPU": 64}, {}, ("cpu", 12, 0.0, 4.0, 8)),
    # Explicit settings win.
    ({"CPU": 64, "GPU": 2}, {"actors": 1, "batch_size": 16, "cpus_per_actor": 4},
     ("cuda", 1, 1.0, 4.0, 16)),
])
def test_plan_actors(cluster, kwargs, expected):
    plan = plan_actors(ModelConfig(**kwargs), cluster)
    assert (plan.device, plan.actors, plan.num_gpus, plan.num_cpus, plan.batch_size) == expected


def test_gpus_per_actor_without_gpus_is_an_error():
    with pytest.raises(ValueError, match="no GPUs"):
        plan_actors(ModelConfig(gpus_per_actor=1), {"CPU": 8})


@pytest.mark.parametrize("cpus,cores,kwargs,expected", [
    # A small machine: one 1-thread actor per core, half the logical CPUs reserved for them.
    (2, 2, {}, (2, 1, 0.5)),
    (4, 2, {}, (2, 1, 1.0)),
    # A larger one: multi-threaded actors on 3/4 of the CPUs, every core used.
    (16, 16, {}, (3, 5, 4.0)),
    # Explicit settings win; threads still follow the cores.
    (2, 2, {"actors": 1}, (1, 2, 1.0)),
    (4, 2, {"cpus_per_actor": 2}, (1, 2, 2.0)),
])
def test_local_ray_actors_use_every_core(cpus, cores, kwargs, expected):
    plan = plan_actors(ModelConfig(**kwargs), {"CPU": cpus}, local_cores=cores)
    assert (plan.actors, plan.threads, plan.num_cpus) == expected


def test_initial_actors_follow_the_known_rows(tmp_path):
    """Loose files: one row per unit, so a small input starts fewer actors. Shards: the rows
    are not known from the plan, so every actor starts (a shard of 1,000 images is one unit)."""
    from pipeline.config import SourceConfig
    from pipeline.sources import plan_source

    plan = plan_actors(ModelConfig(), {"CPU": 64})  # 12 actors, 32 rows per call
    assert [initial_actors(plan, n) for n in (1, 32, 33, 10_000, None)] == [1, 1, 2, 12, 12]
    for i in range(3):
        (tmp_path / "files" / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "files" / f"{i}.jpg").write_bytes(b"x")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-000.tar").write_bytes(b"x")
    assert plan_source(SourceConfig(uri=str(tmp_path / "files"))).known_rows == 3
    assert plan_source(SourceConfig(uri=str(tmp_path / "shards"))).known_rows is None


def test_model_actor_options_follow_the_device():
    cpu = model_remote_args(plan_actors(ModelConfig(), {"CPU": 2}, local_cores=2))
    gpu = model_remote_args(plan_actors(ModelConfig(), {"CPU": 16, "GPU": 2}))
    assert cpu == {"num_cpus": 0.5, "runtime_env": {"env_vars": CPU_MALLOC_ENV}}
    assert gpu == {"num_cpus": 1.0, "num_gpus": 1.0}  # untested on GPUs: left to the default


class _FaultProbe:
    """What a model actor's worker thread sees: the page faults of each U²-Net† forward."""

    def minor_faults_per_forward(self, rounds: int) -> list[int]:
        import resource
        from concurrent.futures import ThreadPoolExecutor

        torch.set_num_threads(1)
        model = build_model("u2netp").eval()
        x = torch.rand(1, 3, 320, 320)

        def run() -> list[int]:  # in a worker thread, as Ray Data calls the model
            faults = []
            with torch.inference_mode():
                for _ in range(rounds):
                    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
                    model(x)
                    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
            return faults

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(run).result()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc malloc's")
def test_cpu_model_actors_reuse_activation_memory(ray_local):
    """A real actor with the model stage's options: once warm, a forward pass in its worker
    thread reuses the memory of the last one. The same actor without the options faults
    its activations in again on every pass, so the check is not vacuous. Medians of 5 warm
    passes, because the heap now and then grows by a block (measured at 320 px, batch 1:
    medians 0–1 with the options, 25,600–57,600 without; single passes up to 12,800 with)."""
    import statistics

    ray = ray_local
    probe = ray.remote(_FaultProbe)
    opts = model_remote_args(plan_actors(ModelConfig(), {"CPU": 2}, local_cores=2))
    tuned = probe.options(**opts).remote()
    default = probe.options(num_cpus=opts["num_cpus"]).remote()
    tuned_faults, default_faults = ray.get([tuned.minor_faults_per_forward.remote(6),
                                            default.minor_faults_per_forward.remote(6)])
    assert statistics.median(default_faults[1:]) > 10_000, default_faults
    assert statistics.median(tuned_faults[1:]) < 1_000, tuned_faults
    for actor in (tuned, default):
        ray.kill(actor)


def test_default_batch_scales_with_pixels():
    assert default_batch_size("cpu", 320) == 8
    assert default_batch_size("cuda", 320) == 64
    assert default_batch_size("cuda", 640) == 16
    assert default_batch_size("cuda", 64) == 512  # capped at 8× the 320 default
    assert default_batch_size("cpu", 1024) == 1


@pytest.mark.parametrize("pad", [False, True])
def test_predictor_batches_equal_single_images(weights, pad):
    """Batches of 4 over 11 images (a short last batch), padded as compiled/GPU actors pad,
    with a gray-flagged image: the same maps as the model run on each image alone."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (11, 64, 64, 3), dtype=np.uint8)
    gray = np.zeros(11, bool)
    gray[5] = True
    images[5] = images[5, :, :, :1]  # a gray image, as decode ships it: three equal channels
    pred = U2NetPredictor(ModelConfig(name="u2netp", input_size=64, batch_size=4, precision="fp32"),
                          weights, threads=1)
    pred.pad_batches = pad
    got = pred.predict_uint8(images, gray)

    model = load_weights(build_model("u2netp"), weights).eval()
    with torch.inference_mode():
        want = np.concatenate([to_uint8_map(probabilities(model(normalize(images[i:i + 1],
                                                                          gray=gray[i:i + 1]))[0]))
                               for i in range(11)])
    assert got.shape == (11, 64, 64) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want).max() <= 1  # batched vs single conv rounding
    assert pred.predict_uint8(images[:0], gray[:0]).shape == (0, 64, 64)
