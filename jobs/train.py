"""Train U²-Net from scratch with Ray Train (DDP over TorchTrainer), fed by Ray Data.

    python -m jobs.train --images DUTS-TR/im --masks DUTS-TR/gt --output s3://bucket/runs \\
        --name duts-u2net --workers 4 --use-gpu --epochs 100

The paper's recipe: resize to 320, random 288 crop and flip (CPU, in Ray Data), Adam(1e-3,
(0.9, 0.999), 1e-8, no weight decay), batch 12 per worker, the 7-term deep-supervision BCE.
Every epoch reports the training loss (mean over every worker's samples) and validation MAE and
max Fβ (one `SODMetrics` per worker, summed across workers), and saves a checkpoint (model in
the official key layout, optimizer, epoch, config, metric history).

Under ``<output>/<name>/``: Ray Train's run folder (checkpoints), ``metrics.jsonl`` (one line per
epoch), ``curves.png`` and, after the last epoch, ``weights.pth`` (a plain state dict that the
official code and `u2net_core.load_weights` load strictly).

Rerunning with the same ``--output``/``--name`` resumes from the latest checkpoint and trains
only the missing epochs (a larger ``--epochs`` extends a finished run); a worker failure is
retried from the last checkpoint up to ``--max-failures`` times.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from jobs._common import UserError, add_ray_arguments, init_ray, job_main
from pipeline import storage
from pipeline.allocator import cpu_runtime_env
from pipeline.labelled import (EpochShuffle, Holdout, LabelledDataError, LabelledPlan,
                               LabelledSource, plan_labelled, read_labelled, stable_hash64)

log = logging.getLogger("u2net_ray.train")

TRAIN_KEY, VAL_KEY = "train", "val"
MODEL_FILE, STATE_FILE, META_FILE = "model.pt", "training_state.pt", "meta.json"
CHECKPOINT_FORMAT = 1
# Settings that define what a checkpoint *is*: resuming with different values would silently
# train another model, so it is refused. Everything else (lr, batch size, workers) may change.
_IDENTITY_KEYS = ("model", "input_size", "crop_size")
# Ray Data reservations of the CPU stages: reading is I/O-bound and reserves a quarter CPU,
# decode + augment half a CPU. Fractions let several tasks run beside the training workers on a
# small machine (see `plan_cpus_per_worker`); the real work is bounded by the cores anyway.
READ_CPUS = 0.25
AUGMENT_CPUS = 0.5


# ------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training worker needs (passed to Ray Train as a plain dict)."""

    model: str = "u2net"
    epochs: int = 1
    batch_size: int = 12
    input_size: int = 320
    crop_size: int = 288
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    seed: int = 0
    flip: str = "horizontal"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16: GPU only)
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    shuffle_buffer: int = 0  # worker-side shuffle buffer (rows); shards and Parquet only
    has_val: bool = True
    run_uri: str = ""
    # S3 options captured on the driver for rank 0's progress files (never saved: credentials).
    storage_options: Optional[dict] = None
    inject_failure: Optional[dict] = None  # test hook, see --inject-failure

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in _IDENTITY_KEYS}


@dataclass(frozen=True)
class RunLocation:
    """Where a run lives: `<output>/<name>`, as Ray Train and our own writers see it."""

    output: str
    name: str
    storage_path: str  # for Ray Train: local absolute path, or the path without scheme
    storage_filesystem: Any = None  # pyarrow filesystem for remote outputs, None for local

    @property
    def run_uri(self) -> str:
        return storage.join_uri(self.output, self.name)

    @classmethod
    def of(cls, output: str, name: str) -> "RunLocation":
        if storage.is_local(output):
            return cls(output, name, storage.split_uri(output)[1])
        # Ray Train takes a pyarrow filesystem built from our S3 settings (endpoint and
        # credentials baked in, so they reach every worker) and then a path without scheme.
        fs, path = storage.pyarrow_filesystem(output)
        return cls(output, name, path, fs)


def plan_cpus_per_worker(workers: int, use_gpu: bool, cluster: dict,
                         cpus_per_worker: float | None = None) -> float:
    """Logical CPUs each training worker reserves.

    Logical CPUs are a scheduling budget (DESIGN §5): two workers reserving one CPU each on a
    2-CPU Ray leave nothing for Ray Data's read and augment tasks, and the run stalls without an
    error. So by default the workers take at most half of the cluster's logical CPUs (at most
    one each when a GPU does the work), and Ray Data schedules its stages in the other half.
    """
    total_cpus = float(cluster.get("CPU", 0))
    if use_gpu and float(cluster.get("GPU", 0)) < workers:
        raise UserError(f"--use-gpu with {workers} workers needs {workers} GPUs; the cluster "
                        f"has {int(cluster.get('GPU', 0))}")
    if cpus_per_worker is None:
        share = total_cpus / 2 / workers
        cpus_per_worker = min(1.0, share) if use_gpu else share
        # Ray accepts fractions down to 1e-4; round down to a readable 0.05 step.
        cpus_per_worker = max(0.05, math.floor(cpus_per_worker * 20) / 20)
    if cpus_per_worker <= 0 or cpus_per_worker * workers > total_cpus:
        raise UserError(f"{workers} workers × {cpus_per_worker} CPUs do not fit the cluster's "
                        f"{total_cpus:g} logical CPUs; change --cpus-per-worker or --workers")
    return cpus_per_worker


def torch_threads(cpus_per_worker: float, workers_on_node: int) -> int:
    """Intra-op threads of one worker: its reservation (at least 1), and never more than its
    share of the node's cores, so co-located workers do not oversubscribe them."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(int(cpus_per_worker), cores // max(1, workers_on_node)))


# --------------------------------------------------------------------------- checkpoint files


def _read_checkpoint_file(checkpoint, name: str) -> bytes:
    """One file of a Ray Train checkpoint, read from wherever the checkpoint lives."""
    fs = checkpoint.filesystem
    with fs.open_input_stream(f"{checkpoint.path.rstrip('/')}/{name}") as f:
        return f.read()


def latest_checkpoint(location: RunLocation):
    """The latest checkpoint of the run at `location`, or None for a new run."""
    from ray.train import Result

    run_path = f"{location.storage_path.rstrip('/')}/{location.name}"
    try:
        result = Result.from_path(run_path, storage_filesystem=location.storage_filesystem)
    except RuntimeError:
        return None  # no run folder, or no checkpoint registered in it yet
    return result.checkpoint


def latest_meta(location: RunLocation) -> dict | None:
    checkpoint = latest_checkpoint(location)
    if checkpoint is None:
        return None
    return json.loads(_read_checkpoint_file(checkpoint, META_FILE))


def epochs_done(location: RunLocation) -> int:
    meta = latest_meta(location)
    return int(meta["epoch"]) if meta else 0


# ------------------------------------------------------------------------------- run outputs


def metrics_jsonl(history: list[dict]) -> bytes:
    # One line per epoch, whatever happened in between: the history comes from the checkpoint
    # that training resumed from, so retried or resumed epochs appear once.
    by_epoch = {int(row["epoch"]): row for row in history}
    return "".join(json.dumps(by_epoch[e], sort_keys=True) + "\n" for e in sorted(by_epoch)).encode()


def curves_png(history: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = sorted(history, key=lambda r: r["epoch"])
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker="o", label="total (7 terms)")
    ax_loss.plot(epochs, [r["train_fused_loss"] for r in rows], marker="o", label="fused d0")
    ax_loss.set(xlabel="epoch", ylabel="BCE", title="training loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    val = [r for r in rows if r.get("val_mae") is not None]
    if val:
        ax_val.plot([r["epoch"] for r in val], [r["val_max_f"] for r in val], marker="o",
                    label="max Fβ")
        ax_val.plot([r["epoch"] for r in val], [r["val_mae"] for r in val], marker="o",
                    label="MAE")
        ax_val.legend()
    else:
        ax_val.text(0.5, 0.5, "no validation set", ha="center", va="center")
    ax_val.set(xlabel="epoch", title="validation", ylim=(0, 1))
    ax_val.grid(alpha=0.3)
    for ax in (ax_loss, ax_val):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_history_files(run_uri: str, history: list[dict], title: str,
                        options: dict | None = None) -> None:
    storage.write_bytes(storage.join_uri(run_uri, "metrics.jsonl"), metrics_jsonl(history),
                        options)
    storage.write_bytes(storage.join_uri(run_uri, "curves.png"), curves_png(history, title),
                        options)


def export_run(location: RunLocation) -> dict:
    """Write metrics.jsonl, curves.png and weights.pth from the run's latest checkpoint."""
    checkpoint = latest_checkpoint(location)
    if checkpoint is None:
        raise UserError(f"run {location.run_uri} has no checkpoint to export")
    meta = json.loads(_read_checkpoint_file(checkpoint, META_FILE))
    write_history_files(location.run_uri, meta["history"], location.name)
    # model.pt was written by `u2net_core.save_weights`: already the plain official layout.
    storage.write_bytes(storage.join_uri(location.run_uri, "weights.pth"),
                        _read_checkpoint_file(checkpoint, MODEL_FILE))
    return meta


# ------------------------------------------------------------------------- the worker's loop


def _maybe_inject_failure(cfg: TrainConfig, rank: int, world: int, epoch: int) -> None:
    """Test hook: raise once, on one rank, in one epoch; a marker file makes it happen once."""
    spec = cfg.inject_failure
    if not spec or epoch != spec["epoch"] or rank != min(spec["rank"], world - 1):
        return
    marker = spec["marker"]
    if os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(f"rank {rank} epoch {epoch}\n")
    raise RuntimeError(f"injected failure on rank {rank} in epoch {epoch} (--inject-failure)")


def _all_reduce_sum(values, device):
    """Sum a float64 vector over all workers (a no-op when there is one)."""
    import torch
    import torch.distributed as dist

    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def _autocast_dtype(cfg: TrainConfig, device):
    """The autocast dtype of a worker, or None for plain fp32.

    GPU: `auto` is bf16 where the card supports it, else fp16 (with a grad scaler). CPU: `auto`
    is fp32, so a CPU run is reproducible anywhere; `--precision bf16` opts in, and pays on CPUs
    with native bf16 (AMX, AVX512-BF16: 2.2x the fp32 step rate measured in BENCHMARKS.md).
    """
    import torch

    if cfg.precision == "fp32":
        return None
    if device.type != "cuda":
        return torch.bfloat16 if cfg.precision == "bf16" else None
    if cfg.precision == "fp16":
        return torch.float16
    if cfg.precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _restore(checkpoint, model, optimizer, scaler) -> tuple[int, list[dict]]:
    import torch

    from u2net_core import load_weights

    # Read the files into memory rather than `checkpoint.as_directory()`: two restarted workers
    # on one node restoring the same remote checkpoint race on its shared download folder
    # (ray-project/ray#48726) and one of them reads a half-rewritten file.
    load_weights(model, torch.load(io.BytesIO(_read_checkpoint_file(checkpoint, MODEL_FILE)),
                                   map_location="cpu", weights_only=True))
    state = torch.load(io.BytesIO(_read_checkpoint_file(checkpoint, STATE_FILE)),
                       map_location="cpu", weights_only=True)
    meta = json.loads(_read_checkpoint_file(checkpoint, META_FILE))
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(meta["epoch"]), list(meta["history"])


def _save_checkpoint_dir(directory: str, model, optimizer, scaler, epoch: int, cfg: TrainConfig,
                         history: list[dict]) -> None:
    import torch

    from u2net_core import save_weights

    save_weights(model, os.path.join(directory, MODEL_FILE))
    torch.save({"optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "epoch": epoch}, os.path.join(directory, STATE_FILE))
    meta = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "config": _config_json(cfg),
            "history": history}
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)


def _config_json(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    for private in ("inject_failure", "storage_options"):
        d.pop(private, None)
    return d


def _inputs(batch, device):
    import torch

    from pipeline.augment import model_inputs

    x = model_inputs(batch["image"].to(device, non_blocking=True), batch["gray"])
    return x.contiguous(memory_format=torch.channels_last)


def _train_one_epoch(cfg, model, optimizer, scaler, shard, device, epoch, rank, world):
    import torch

    from pipeline.augment import mask_targets
    from u2net_core import deep_supervision_loss

    model.train()
    amp_dtype = _autocast_dtype(cfg, device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    fused_sum = torch.zeros((), dtype=torch.float64, device=device)
    samples = 0
    mismatched = torch.zeros((), dtype=torch.int64, device=device)
    shuffle = {}
    if cfg.shuffle_buffer > 0:
        shuffle = {"local_shuffle_buffer_size": cfg.shuffle_buffer,
                   "local_shuffle_seed": stable_hash64(f"{cfg.seed}:{epoch}:{rank}") % 2**32}
    start, cpu_start = time.perf_counter(), time.process_time()
    for step, batch in enumerate(shard.iter_torch_batches(batch_size=cfg.batch_size,
                                                          prefetch_batches=2, **shuffle)):
        n = int(batch["image"].shape[0])
        # Summed on the device: no host sync per step.
        mismatched += (batch["epoch"].to(device) != epoch).sum()
        x = _inputs(batch, device)
        y = mask_targets(batch["mask"].to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        total, fused = deep_supervision_loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            optimizer.step()
        loss_sum += total.detach().double() * n
        fused_sum += fused.detach().double() * n
        samples += n
        if step == 0:
            _maybe_inject_failure(cfg, rank, world, epoch)  # mid-epoch, after one real step
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the queued steps belong to this epoch's time
    seconds = time.perf_counter() - start
    # CPU time of this worker process (all its threads, data iteration included): on a shared
    # machine, images per CPU-second compare setups where wall-clock rates cannot.
    cpu_seconds = time.process_time() - cpu_start
    return (loss_sum.item(), fused_sum.item(), samples, seconds, int(mismatched.item()),
            cpu_seconds)


def metrics_to_vector(metrics):
    """A `SODMetrics` state as one float64 vector: every entry is additive, so summing the
    vectors of several accumulators (an all-reduce, or a sum over Ray Data blocks) merges them."""
    import numpy as np

    state = metrics.state_dict()
    return np.concatenate([np.atleast_1d(state[k]).astype(np.float64)
                           for k in metrics.ADDITIVE_FIELDS])


def metrics_from_vector(vector):
    """Inverse of `metrics_to_vector`."""
    import numpy as np

    from u2net_core import SODMetrics

    template = SODMetrics().state_dict()
    state, offset = {}, 0
    for k in SODMetrics.ADDITIVE_FIELDS:
        size = np.atleast_1d(template[k]).size
        state[k] = vector[offset:offset + size] if size > 1 else vector[offset]
        offset += size
    if offset != len(vector):
        raise ValueError(f"metrics vector has {len(vector)} values, expected {offset}")
    return SODMetrics.from_state_dict(state)


def _validate(cfg, model, shard, device):
    """Per-worker `SODMetrics` over this worker's part of the validation set, summed over all
    workers (every field of its state is additive), so the result is the whole set's."""
    import torch

    from u2net_core import SODMetrics
    from u2net_core.transforms import probabilities, to_uint8_map

    net = getattr(model, "module", model)  # no DDP hooks: ranks see different row counts
    net.eval()
    amp_dtype = _autocast_dtype(cfg, device)
    metrics = SODMetrics()
    with torch.inference_mode():
        for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, prefetch_batches=2):
            x = _inputs(batch, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                fused = net(x)[0]
            preds = to_uint8_map(probabilities(fused))
            gts = batch["mask"].cpu().numpy()
            for pred, gt in zip(preds, gts):
                metrics.update(pred, gt)
    total = metrics_from_vector(_all_reduce_sum(metrics_to_vector(metrics), device))
    return (total.compute() if total.count else None), total.count


def train_loop_per_worker(config: dict) -> dict:
    """What every Ray Train worker runs."""
    import ray.train
    import ray.train.torch
    import torch

    from u2net_core import build_model

    cfg = TrainConfig(**{**config, "betas": tuple(config["betas"])})
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(torch_threads(cfg.cpus_per_worker, ctx.get_local_world_size()))
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size: autotuned kernels pay off

    torch.manual_seed(cfg.seed)  # same initial weights everywhere (DDP broadcasts rank 0's)
    model = build_model(cfg.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
    amp_dtype = _autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        start_epoch, history = _restore(checkpoint, model, optimizer, scaler)
    # channels_last on every device: oneDNN's and cuDNN's fast convolutions are NHWC (on CPU
    # it doubles the bf16 step rate, BENCHMARKS.md); inputs follow in `_inputs`.
    model = model.to(memory_format=torch.channels_last)
    # Moves the parameters in place (the optimizer keeps pointing at them) and wraps in DDP.
    model = ray.train.torch.prepare_model(model)
    for state in optimizer.state.values():  # restored Adam moments follow their parameters
        for k, v in state.items():
            if torch.is_tensor(v) and k != "step":
                state[k] = v.to(device)

    train_shard = ray.train.get_dataset_shard(TRAIN_KEY)
    val_shard = ray.train.get_dataset_shard(VAL_KEY) if cfg.has_val else None
    trained = []
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        loss_sum, fused_sum, n, seconds, mismatched, cpu_seconds = _train_one_epoch(
            cfg, model, optimizer, scaler, train_shard, device, epoch, rank, world)
        totals = _all_reduce_sum([loss_sum, fused_sum, n, seconds, mismatched, cpu_seconds],
                                 device)
        val, val_count = _validate(cfg, model, val_shard, device) if val_shard else (None, 0)
        total_n = int(totals[2])
        row = {
            "epoch": epoch,
            "train_loss": totals[0] / max(total_n, 1),
            "train_fused_loss": totals[1] / max(total_n, 1),
            "train_samples": total_n,
            # Images per worker-second of wall time (the mean worker's rate).
            "train_images_per_s_per_worker": total_n / max(totals[3], 1e-9),
            "train_cpu_seconds": totals[5],  # summed over the training worker processes
            "val_samples": int(val_count),
            "val_mae": val["mae"] if val else None,
            "val_max_f": val["max_f"] if val else None,
            "epoch_seconds": time.perf_counter() - t0,
            "workers": world,
            "lr": cfg.lr,
            "augment_epoch_mismatches": int(totals[4]),
        }
        history.append(row)
        net = getattr(model, "module", model)
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                _save_checkpoint_dir(d, net, optimizer, scaler, epoch, cfg, history)
                ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"checkpoint_epoch_{epoch:06d}")
            # Live progress next to the run; the driver rewrites both from the last checkpoint.
            try:
                write_history_files(cfg.run_uri, history, os.path.basename(cfg.run_uri),
                                    cfg.storage_options)
            except Exception as exc:  # progress files are a convenience, never a failure
                logging.getLogger("u2net_ray.train").warning("could not write progress: %s", exc)
        else:
            ray.train.report(row)
        trained.append(epoch)
    return {"start_epoch": start_epoch, "epochs_trained": trained}


# ------------------------------------------------------------------------ datasets on Ray Data


def build_train_dataset(plan: LabelledPlan, holdout: Holdout | None, location: RunLocation,
                        cfg: TrainConfig):
    """The training dataset; Ray Train calls this each time its worker group (re)starts.

    Built at (re)start, not once up front, because the epoch-keyed augmentation and shuffle
    need the epochs already done, and after a worker failure that is the latest checkpoint's
    epoch, known only then.
    """
    from pipeline.augment import AugmentConfig, train_transform

    done = epochs_done(location)
    ds = read_labelled(plan, shuffle=EpochShuffle(cfg.seed, done), holdout=holdout,
                       read_num_cpus=READ_CPUS)
    aug = AugmentConfig(cfg.input_size, cfg.crop_size, cfg.flip, cfg.seed, done)  # type: ignore[arg-type]
    return ds.map_batches(train_transform, batch_format="pyarrow", batch_size=cfg.batch_size,
                          fn_kwargs={"cfg": aug}, num_cpus=AUGMENT_CPUS)


def build_val_dataset(plan: LabelledPlan, holdout: Holdout | None, cfg: TrainConfig):
    from pipeline.augment import val_transform

    ds = read_labelled(plan, holdout=holdout, read_num_cpus=READ_CPUS)
    return ds.map_batches(val_transform, batch_format="pyarrow", batch_size=cfg.batch_size,
                          fn_kwargs={"input_size": cfg.input_size}, num_cpus=AUGMENT_CPUS)


def _exact_validation_data_config():
    """Ray Train's DataConfig, except that validation is split with ``equal=False``.

    The default split (``equal=True``) trims rows so that every worker gets as many: right for
    training (DDP steps in lockstep), wrong for validation, whose metrics must cover every
    image exactly once. Validation runs without collectives until the final all-reduce, so
    uneven parts are fine.
    """
    from ray.train import DataConfig

    class ExactValidationDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            if VAL_KEY not in datasets:
                return super().configure(datasets, world_size, worker_handles, worker_node_ids,
                                         **kwargs)
            rest = {k: v for k, v in datasets.items() if k != VAL_KEY}
            output = (super().configure(rest, world_size, worker_handles, worker_node_ids,
                                        **kwargs) if rest else [{} for _ in range(world_size)])
            ds = datasets[VAL_KEY]
            ds = ds.copy(ds)
            ds.context.execution_options = self.default_ingest_options()
            for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[i][VAL_KEY] = split
            return output

    return ExactValidationDataConfig()


# ---------------------------------------------------------------------------------- the driver


@dataclass
class TrainSummary:
    run_uri: str
    epochs: int
    start_epoch: int
    epochs_trained: list[int]
    last_metrics: dict | None
    seconds: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _check_resume(meta: dict | None, cfg: TrainConfig, location: RunLocation) -> int:
    if meta is None:
        return 0
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"run {location.run_uri} has checkpoints in an unknown format "
                        f"({meta.get('format')}); use another --name")
    old = {k: meta["config"].get(k) for k in _IDENTITY_KEYS}
    if old != cfg.identity():
        diff = ", ".join(f"--{k.replace('_', '-')} {old[k]} (now {getattr(cfg, k)})"
                         for k in _IDENTITY_KEYS if old[k] != getattr(cfg, k))
        raise UserError(f"run {location.run_uri} was trained with {diff}; resume with the same "
                        f"settings or use another --name")
    return int(meta["epoch"])


def labelled_source(args, images: str | None, masks: str | None,
                    input_uri: str | None) -> LabelledSource:
    """A `LabelledSource` from the shared input flags (see `add_labelled_arguments`)."""
    if args.source == "folders":
        return LabelledSource("folders", images=images, masks=masks)
    return LabelledSource(args.source, input=input_uri, image_member=args.image_member,
                          mask_member=args.mask_member, image_column=args.image_column,
                          mask_column=args.mask_column, key_column=args.key_column)


def check_input_flags(args) -> None:
    if args.source == "folders":
        if not args.images or not args.masks:
            raise UserError("give --images DIR and --masks DIR (or --source webdataset|parquet "
                            "with --input)")
        if args.input:
            raise UserError("--input is for --source webdataset|parquet; folders use "
                            "--images/--masks")
    elif not args.input:
        raise UserError(f"--source {args.source} needs --input")


def _sources(args) -> tuple[LabelledSource, LabelledSource | None]:
    check_input_flags(args)
    train_src = labelled_source(args, args.images, args.masks, args.input)
    val_src = None
    if args.val_images or args.val_masks or args.val_input:
        if args.source == "folders" and not (args.val_images and args.val_masks):
            raise UserError("give both --val-images and --val-masks")
        if args.source != "folders" and not args.val_input:
            raise UserError(f"--source {args.source} takes its validation set from --val-input")
        val_src = labelled_source(args, args.val_images, args.val_masks, args.val_input)
    return train_src, val_src


def plan_or_user_error(source: LabelledSource) -> LabelledPlan:
    try:
        return plan_labelled(source)
    except LabelledDataError as exc:
        raise UserError(str(exc)) from None


def _parse_failure(spec: str | None) -> dict | None:
    if not spec:
        return None
    try:
        rank, epoch, marker = spec.split(":", 2)
        return {"rank": int(rank), "epoch": int(epoch), "marker": os.path.abspath(marker)}
    except ValueError:
        raise UserError("--inject-failure takes RANK:EPOCH:MARKER_FILE") from None


def _validate_args(args) -> None:
    if args.epochs < 1:
        raise UserError("--epochs must be at least 1")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.input_size < 32:
        raise UserError("--input-size must be at least 32")
    if not 0 < args.crop_size <= args.input_size:
        raise UserError(f"--crop-size must be in 1..--input-size ({args.input_size})")
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    if not 0 <= args.val_fraction < 1:
        raise UserError("--val-fraction must be in [0, 1)")
    if args.lr <= 0:
        raise UserError("--lr must be positive")
    if args.precision == "fp16" and not args.use_gpu:
        raise UserError("--precision fp16 needs --use-gpu (CPU training takes fp32 or bf16)")
    if "/" in args.name or args.name in ("", ".", ".."):
        raise UserError("--name must be a plain folder name")


def run(args: argparse.Namespace) -> int:
    from ray.train import TrainingFailedError

    try:
        summary = train(args)
    except TrainingFailedError as exc:
        # The workers' tracebacks are in the log above; the run keeps its checkpoints, and
        # rerunning the same command resumes from the latest one.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: training failed ({first}); rerun the same command to resume from the "
              f"last checkpoint", file=sys.stderr)
        return 1
    print(json.dumps(summary.to_json(), sort_keys=True))
    return 0


def train(args: argparse.Namespace) -> TrainSummary:
    """The whole job: plan inputs, resume or start the run, train, export. Returns a summary."""
    t0 = time.perf_counter()
    _validate_args(args)
    train_src, val_src = _sources(args)
    train_plan = plan_or_user_error(train_src)
    val_plan, train_holdout, val_holdout = None, None, None
    if val_src is not None:
        val_plan = plan_or_user_error(val_src)
    elif args.val_fraction > 0:
        val_plan = train_plan
        train_holdout = Holdout(args.val_fraction, "train")
        val_holdout = Holdout(args.val_fraction, "val")
        if train_plan.pairs_known:
            n_val = len(train_plan.with_holdout(val_holdout))
            if n_val == 0 or n_val == len(train_plan):
                raise UserError(f"--val-fraction {args.val_fraction} of {len(train_plan)} images "
                                f"leaves {'no' if n_val == 0 else 'only'} validation images; "
                                f"change it or give --val-images/--val-masks")

    location = RunLocation.of(args.output, args.name)
    failure = _parse_failure(args.inject_failure)
    base = TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.batch_size,
                       input_size=args.input_size, crop_size=args.crop_size, lr=args.lr,
                       seed=args.seed, flip=args.flip, precision=args.precision,
                       use_gpu=args.use_gpu, shuffle_buffer=0 if train_plan.pairs_known
                       else args.shuffle_buffer, has_val=val_plan is not None,
                       run_uri=location.run_uri, inject_failure=failure,
                       storage_options=None if storage.is_local(location.run_uri)
                       else storage.s3_options())
    done = _check_resume(latest_meta(location), base, location)
    if done >= args.epochs:
        log.info("run %s already has %d epochs (asked for %d): nothing to train",
                 location.run_uri, done, args.epochs)
        meta = export_run(location)
        return TrainSummary(location.run_uri, args.epochs, done, [],
                            meta["history"][-1] if meta["history"] else None,
                            time.perf_counter() - t0)
    if done:
        log.info("resuming %s from epoch %d of %d", location.run_uri, done, args.epochs)

    init_ray(args.address, args.num_cpus)
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cluster = ray.cluster_resources()
    workers = args.workers or (int(cluster.get("GPU", 0)) if args.use_gpu else 1) or 1
    cpus = plan_cpus_per_worker(workers, args.use_gpu, cluster, args.cpus_per_worker)
    cfg = dataclasses.replace(base, workers=workers, cpus_per_worker=cpus)
    log.info("training %s on %d %s worker(s), %.2f logical CPUs reserved each",
             cfg.model, workers, "GPU" if cfg.use_gpu else "CPU", cpus)

    datasets: dict[str, Any] = {
        TRAIN_KEY: functools.partial(build_train_dataset, train_plan, train_holdout, location, cfg)}
    if val_plan is not None:
        datasets[VAL_KEY] = build_val_dataset(val_plan, val_holdout, cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dataclasses.asdict(cfg),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=args.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=location.name, storage_path=location.storage_path,
            storage_filesystem=location.storage_filesystem,
            failure_config=FailureConfig(max_failures=args.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=args.keep_checkpoints or None),
            # CPU workers: the allocator settings of the inference actors (`pipeline.allocator`;
            # the training thread faulted every activation in again each step).
            worker_runtime_env=None if args.use_gpu else cpu_runtime_env()),
        datasets=datasets,
        dataset_config=_exact_validation_data_config(),
    )
    result = trainer.fit()
    meta = export_run(location)
    returned = result.return_value or {}
    return TrainSummary(location.run_uri, args.epochs, int(returned.get("start_epoch", done)),
                        list(returned.get("epochs_trained", [])),
                        meta["history"][-1] if meta["history"] else None,
                        time.perf_counter() - t0)


# ------------------------------------------------------------------------------------- the CLI


def add_labelled_arguments(parser: argparse.ArgumentParser, *, val: bool) -> None:
    """Input flags shared by train and evaluate."""
    src = parser.add_argument_group("labelled input")
    src.add_argument("--source", choices=("folders", "webdataset", "parquet"), default="folders",
                     help="layout of the input (default: folders, i.e. --images + --masks)")
    src.add_argument("--images", help="folder of images (DUTS layout), matched to masks by stem")
    src.add_argument("--masks", help="folder of grayscale PNG masks, same stems as the images")
    src.add_argument("--input", help="WebDataset shard(s) or Parquet file(s): a file or a folder")
    src.add_argument("--image-member", default="jpg",
                     help="WebDataset member holding the image (default: jpg)")
    src.add_argument("--mask-member", default="png",
                     help="WebDataset member holding the mask (default: png)")
    src.add_argument("--image-column", default="image",
                     help="Parquet column of encoded image bytes (default: image)")
    src.add_argument("--mask-column", default="mask",
                     help="Parquet column of encoded mask bytes (default: mask)")
    src.add_argument("--key-column", default="key",
                     help="Parquet column with a sample id, if any (default: key)")
    if val:
        src.add_argument("--val-images", help="validation images folder (instead of a split)")
        src.add_argument("--val-masks", help="validation masks folder")
        src.add_argument("--val-input", help="validation shards / Parquet (non-folder sources)")
        src.add_argument("--val-fraction", type=float, default=0.1,
                         help="without a validation set, hold out this fraction of the input, "
                              "chosen by a stable hash of each key (default: 0.1; 0 = none)")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from u2net_core.registry import MODELS

    add_labelled_arguments(parser, val=True)
    out = parser.add_argument_group("run")
    out.add_argument("--output", required=True,
                     help="folder or s3:// prefix holding runs; the run is <output>/<name>")
    out.add_argument("--name", required=True,
                     help="run name; rerunning a name resumes it from its latest checkpoint")
    out.add_argument("--keep-checkpoints", type=int, default=3,
                     help="checkpoints kept (the latest always is; 0 = all; default: 3)")
    hp = parser.add_argument_group("training")
    hp.add_argument("--model", choices=sorted(MODELS), default="u2net", help="model variant (default: u2net)")
    hp.add_argument("--epochs", type=int, default=1, help="total epochs of the run (default: 1)")
    hp.add_argument("--batch-size", type=int, default=12, help="per worker (default: 12)")
    hp.add_argument("--input-size", type=int, default=320, help="resize side (default: 320)")
    hp.add_argument("--crop-size", type=int, default=288, help="random crop side (default: 288)")
    hp.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    hp.add_argument("--flip", choices=("horizontal", "vertical", "none"), default="horizontal",
                    help="random flip (the official code flips vertically; default: horizontal)")
    hp.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                    help="autocast dtype (auto: on GPU bf16 where supported, else fp16; on CPU "
                         "fp32. bf16 also runs on CPU, fast where it has AMX/AVX512-BF16)")
    hp.add_argument("--seed", type=int, default=0,
                    help="seeds weights, shuffling and augmentation (default: 0)")
    hp.add_argument("--shuffle-buffer", type=int, default=256,
                    help="per-worker shuffle buffer in rows for shards/Parquet (default: 256)")
    sc = parser.add_argument_group("scaling")
    sc.add_argument("--workers", type=int, default=None,
                    help="training workers (default: one per GPU with --use-gpu, else 1)")
    sc.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    sc.add_argument("--cpus-per-worker", type=float, default=None,
                    help="logical CPUs each worker reserves (default: at most half the cluster's "
                         "CPUs in total, so Ray Data can decode beside training)")
    sc.add_argument("--max-failures", type=int, default=0,
                    help="worker failures to recover from the last checkpoint (-1: no limit)")
    add_ray_arguments(parser)
    # Test hook: make rank R raise once in epoch E (a marker file records that it happened).
    parser.add_argument("--inject-failure", metavar="RANK:EPOCH:MARKER", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(add_arguments, run, "python -m jobs.train", (__doc__ or "").splitlines()[0],
                    argv)


if __name__ == "__main__":
    sys.exit(main())
