"""jobs.train on a real local Ray: a 2-worker CPU DDP run that survives an injected worker
failure, resumes to more epochs, and exports weights both model implementations load."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from jobs import train as tr
from jobs.make_dataset import write_dataset
from pipeline.augment import AugmentConfig, crop_params, mask_targets, train_transform
from tests.official_u2net import U2NETP
from u2net_core import build_model, load_weights

# Small enough that Ray's own start-up dominates: 12 images of 48 px, crops of 40, 2 steps per
# worker and epoch.
SMALL = ["--model", "u2netp", "--input-size", "48", "--crop-size", "40", "--batch-size", "3",
         "--seed", "7"]


def _train(*argv: str) -> tr.TrainSummary:
    parser = argparse.ArgumentParser()
    tr.add_arguments(parser)
    return tr.train(parser.parse_args(list(argv)))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("duts")
    write_dataset(root, count=12, seed=1, size=64, val_count=5)
    return root


@pytest.fixture(scope="module")
def inputs(data) -> list[str]:
    return ["--images", str(data / "images"), "--masks", str(data / "masks"),
            "--val-images", str(data / "val" / "images"), "--val-masks", str(data / "val" / "masks")]


@pytest.fixture(scope="module")
def first_run(ray_local, inputs, tmp_path_factory):
    """2 workers, 2 epochs; rank 1 raises once in epoch 2, --max-failures 1 recovers it."""
    out = tmp_path_factory.mktemp("runs")
    marker = out / "failed-once"
    summary = _train(*inputs, *SMALL, "--output", str(out), "--name", "run", "--workers", "2",
                     "--epochs", "2", "--max-failures", "1",
                     "--inject-failure", f"1:2:{marker}")
    run = out / "run"
    return {"out": out, "run": run, "marker": marker, "summary": summary,
            "metrics": _metrics(run), "weights": (run / "weights.pth").read_bytes()}


def test_run_writes_metrics_curves_and_weights(first_run):
    run = first_run["run"]
    rows = first_run["metrics"]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["workers"] == 2
        assert r["train_samples"] == 12 and r["val_samples"] == 5  # every sample, once
        assert np.isfinite(r["train_loss"]) and r["train_loss"] > r["train_fused_loss"] > 0
        assert 0 <= r["val_mae"] <= 1 and 0 <= r["val_max_f"] <= 1
        assert r["augment_epoch_mismatches"] == 0  # Ray Data augmented for the right epoch
        assert r["train_cpu_seconds"] > 0 and r["train_images_per_s_per_worker"] > 0
    assert Image.open(run / "curves.png").size[0] > 0
    assert sorted(p.name for p in run.glob("checkpoint_epoch_*")) == [
        "checkpoint_epoch_000001", "checkpoint_epoch_000002"]


def test_injected_failure_resumed_from_the_last_checkpoint(first_run):
    assert first_run["marker"].exists()  # the failure did happen
    summary = first_run["summary"]
    # The attempt that finished started from epoch 1's checkpoint and trained epoch 2 only.
    assert (summary.start_epoch, summary.epochs_trained) == (1, [2])


def test_exported_weights_load_strictly_in_both_implementations(first_run):
    state = torch.load(io.BytesIO(first_run["weights"]), weights_only=True)
    ours = load_weights(build_model("u2netp"), state).eval()
    official = U2NETP(3, 1)
    official.load_state_dict(state, strict=True)
    official.eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(torch.sigmoid(ours(x)[0]), official(x)[0], atol=1e-5)
    # The exported file is the last checkpoint's model, not the initial weights.
    fresh = build_model("u2netp").state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in state.items() if v.is_floating_point())


def test_resume_trains_only_the_missing_epochs(first_run, inputs):
    args = [*inputs, *SMALL, "--output", str(first_run["out"]), "--name", "run",
            "--workers", "2"]
    # The extra epoch in CPU bf16 autocast: precision may change on resume (it is not part of
    # what the checkpoint is), and this exercises the CPU bf16 training path.
    summary = _train(*args, "--epochs", "3", "--precision", "bf16")
    assert (summary.start_epoch, summary.epochs_trained) == (2, [3])
    rows = _metrics(first_run["run"])
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[:2] == first_run["metrics"]  # history kept as it was, not retrained
    assert rows[2]["augment_epoch_mismatches"] == 0 and np.isfinite(rows[2]["train_loss"])

    again = _train(*args, "--epochs", "3")  # a finished run: nothing to do, no Ray Train
    assert again.epochs_trained == [] and _metrics(first_run["run"]) == rows


def test_resume_with_another_model_is_refused(first_run, inputs, capsys):
    rc = tr.main([*inputs, "--model", "u2net", "--input-size", "48", "--crop-size", "40",
                  "--output", str(first_run["out"]), "--name", "run", "--epochs", "9"])
    assert rc == 2
    assert "was trained with --model u2netp" in capsys.readouterr().err


@pytest.mark.slow
def test_s3_output_trains_resumes_and_exports(ray_local, s3_bucket, data):
    from pipeline import storage

    for folder in ("images", "masks"):  # inputs in S3 too, read by Ray Data tasks
        for path in (data / folder).iterdir():
            storage.write_bytes(f"s3://{s3_bucket}/duts/{folder}/{path.name}", path.read_bytes())
    out = f"s3://{s3_bucket}/runs"
    args = ["--images", f"s3://{s3_bucket}/duts/images", "--masks", f"s3://{s3_bucket}/duts/masks",
            "--val-fraction", "0.3", *SMALL, "--output", out, "--name", "s3run", "--workers", "1"]
    assert _train(*args, "--epochs", "1").epochs_trained == [1]
    assert _train(*args, "--epochs", "2").epochs_trained == [2]
    run = storage.join_uri(out, "s3run")
    rows = [json.loads(x) for x in storage.read_bytes(f"{run}/metrics.jsonl").splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert storage.read_bytes(f"{run}/curves.png").startswith(b"\x89PNG")
    state = torch.load(io.BytesIO(storage.read_bytes(f"{run}/weights.pth")), weights_only=True)
    load_weights(build_model("u2netp"), state)


def test_user_errors_are_one_line(tmp_path, data, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    base = ["--output", str(tmp_path / "out"), "--name", "x"]
    assert tr.main(["--images", str(images), "--masks", str(masks), *base]) == 2
    assert "no images under" in capsys.readouterr().err
    for src in sorted((data / "images").iterdir())[:3]:
        (images / src.name).write_bytes(src.read_bytes())
    for src in sorted((data / "masks").iterdir())[1:3]:
        (masks / src.name).write_bytes(src.read_bytes())
    (masks / "stray.png").write_bytes(b"")
    assert tr.main(["--images", str(images), "--masks", str(masks), *base]) == 2
    err = capsys.readouterr().err.strip()
    assert "1 of 3 images have no mask" in err and "1 of 3 masks have no image" in err
    assert "\n" not in err
    assert tr.main(["--masks", str(masks), *base]) == 2
    assert "give --images DIR and --masks DIR" in capsys.readouterr().err
    assert tr.main(["--images", str(data / "images"), "--masks", str(data / "masks"),
                    "--crop-size", "400", *base]) == 2
    assert "--crop-size must be in" in capsys.readouterr().err


# ------------------------------------------------------------------ pieces, without Ray Train


def test_crop_and_flip_are_keyed_by_seed_epoch_and_sample():
    draws = {e: [crop_params(7, e, f"img{i}", 320, 288) for i in range(32)] for e in (1, 2)}
    assert draws[1] == [crop_params(7, 1, f"img{i}", 320, 288) for i in range(32)]
    assert draws[1] != draws[2]  # another epoch, other crops
    assert draws[1] != [crop_params(8, 1, f"img{i}", 320, 288) for i in range(32)]
    tops = {t for d in draws.values() for t, _, _ in d}
    assert min(tops) >= 0 and max(tops) <= 31 and len(tops) > 10  # official range 0..31
    assert {f for d in draws.values() for _, _, f in d} == {True, False}


def test_train_transform_crops_flips_and_keeps_pairs_aligned():
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:, :32] = 255  # left half white
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        return buf.getvalue()

    keys = [f"k{i}" for i in range(16)] + ["broken"]
    batch = pa.table({"key": keys, "image": [png(rgb)] * 16 + [b"not an image"],
                      "mask": [png(mask)] * 17})
    cfg = AugmentConfig(input_size=64, crop_size=48, flip="horizontal", seed=3)
    out = train_transform(batch, cfg)
    assert out["image"].shape == (16, 48, 48, 3) and out["mask"].shape == (16, 48, 48)
    assert (out["epoch"] == 1).all() and not out["gray"].any()  # "broken" was dropped
    # Image and mask went through the same crop and flip.
    assert np.array_equal(out["image"][..., 0] > 127, out["mask"] > 127)
    flipped = [bool(out["mask"][i, :, -1].max()) for i in range(16)]  # white at the right edge
    assert any(flipped) and not all(flipped)
    targets = mask_targets(torch.from_numpy(out["mask"]))
    assert targets.shape == (16, 1, 48, 48) and float(targets.max()) == 1.0


@pytest.mark.parametrize("precision,device,expected", [
    ("auto", "cpu", None), ("fp32", "cpu", None), ("bf16", "cpu", torch.bfloat16),
    ("fp32", "cuda", None), ("fp16", "cuda", torch.float16), ("bf16", "cuda", torch.bfloat16),
])
def test_autocast_dtype(precision, device, expected):
    cfg = tr.TrainConfig(precision=precision)
    assert tr._autocast_dtype(cfg, torch.device(device)) == expected


def test_fp16_needs_a_gpu(tmp_path, data, capsys):
    rc = tr.main(["--images", str(data / "images"), "--masks", str(data / "masks"), *SMALL,
                  "--output", str(tmp_path), "--name", "x", "--precision", "fp16"])
    assert rc == 2 and "--use-gpu" in capsys.readouterr().err


def test_cpu_budget_leaves_room_for_ray_data():
    # 2 workers on a 2-CPU local Ray: half a CPU each, one CPU left for decode/augment tasks.
    assert tr.plan_cpus_per_worker(2, False, {"CPU": 2.0}) == 0.5
    assert tr.plan_cpus_per_worker(2, False, {"CPU": 4.0}) == 1.0
    assert tr.plan_cpus_per_worker(4, True, {"CPU": 64.0, "GPU": 4.0}) == 1.0
    with pytest.raises(tr.UserError):
        tr.plan_cpus_per_worker(2, True, {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(tr.UserError):
        tr.plan_cpus_per_worker(2, False, {"CPU": 2.0}, cpus_per_worker=1.5)
