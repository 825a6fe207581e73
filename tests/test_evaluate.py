"""jobs.evaluate on a real local Ray: the distributed metrics equal one `SODMetrics` over the
same images with the same preprocessing, whatever the source layout."""

from __future__ import annotations

import functools
import json
import posixpath
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs import evaluate as ev
from jobs.make_dataset import write_dataset
from pipeline.labelled import (Holdout, LabelledSource, plan_labelled, read_labelled,
                               stable_unit_interval)
from pipeline.shards import TarSampleWriter
from u2net_core import SODMetrics, build_model, decode_image, decode_mask, load_weights
from u2net_core.transforms import normalize, probabilities, to_uint8_map

WEIGHTS = Path(__file__).parent / "fixtures" / "u2netp_detweights.pth"
INPUT_SIZE = 64


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """8 pairs of varied aspect ratio, one of them a grayscale JPEG, in all three layouts."""
    root = tmp_path_factory.mktemp("labelled")
    write_dataset(root, count=8, seed=5, size=96, aspect_jitter=0.6)
    gray = sorted((root / "images").iterdir())[3]
    Image.open(gray).convert("L").save(gray, "JPEG", quality=90)
    pairs = [(p.stem, p.read_bytes(), (root / "masks" / f"{p.stem}.png").read_bytes())
             for p in sorted((root / "images").iterdir())]
    (root / "shards").mkdir()
    for i in range(2):  # two shards, to exercise more than one read task
        writer = TarSampleWriter()
        for stem, image, mask in pairs[i::2]:
            writer.add(stem, {"jpg": image, "png": mask})
        (root / "shards" / f"part-{i}.tar").write_bytes(writer.finish())
    (root / "parquet").mkdir()
    pq.write_table(pa.table({"key": [p[0] for p in pairs],
                             "image": pa.array([p[1] for p in pairs], pa.binary()),
                             "mask": pa.array([p[2] for p in pairs], pa.binary())}),
                   root / "parquet" / "pairs.parquet")
    return root, pairs


def direct_metrics(pairs, normalize_mode: str) -> dict:
    return dict(_direct_metrics(tuple(pairs), normalize_mode))


@functools.lru_cache(maxsize=4)
def _direct_metrics(pairs, normalize_mode: str) -> dict:
    """Single process, one image at a time: decode, normalise, model, uint8 map, SODMetrics."""
    model = load_weights(build_model("u2netp"), WEIGHTS).eval()
    metrics = SODMetrics()
    with torch.inference_mode():
        for _, image_bytes, mask_bytes in pairs:
            img = decode_image(image_bytes, INPUT_SIZE)
            x = normalize(np.array(img.array[None]), [img.gray])
            pred = to_uint8_map(probabilities(model(x)[0], normalize_mode))[0]
            metrics.update(pred, decode_mask(mask_bytes, INPUT_SIZE))
    assert metrics.count == len(pairs)
    return metrics.compute()


def _assert_same(got: dict, want: dict, abs_tol: float = 1e-12) -> None:
    assert set(got) == set(want)
    for key in want:  # sums over blocks instead of one running sum: float summation order only
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=abs_tol), key


@pytest.mark.parametrize("mode", ["none", "minmax"])
def test_evaluate_equals_direct_sodmetrics(ray_local, labelled, tmp_path, capsys, mode):
    # One image per model call, as the direct loop: CPU convolutions may pick another kernel
    # for another batch size, and a last-bit difference can move a pixel across a uint8
    # rounding step (min-max stretching makes that likely). Everything else is batched by Ray
    # Data as usual: 8 blocks' metric states are summed on the driver.
    root, pairs = labelled
    out = tmp_path / "metrics.json"
    rc = ev.main(["--images", str(root / "images"), "--masks", str(root / "masks"),
                  "--model", "u2netp", "--weights", str(WEIGHTS),
                  "--input-size", str(INPUT_SIZE), "--normalize", mode, "--batch-size", "1",
                  "--output", str(out)])
    assert rc == 0
    written = json.loads(out.read_text())
    printed = json.loads(capsys.readouterr().out)
    assert written == printed
    _assert_same(written, direct_metrics(pairs, mode))


@pytest.mark.parametrize("source", ["folders", "webdataset", "parquet"])
def test_labelled_layouts_read_the_same_pairs(ray_local, labelled, source):
    # The evaluation pipeline is the same after reading, so the layouts only need to yield the
    # same (image, mask) bytes; their keys follow DESIGN §2.
    root, pairs = labelled
    src = {"folders": LabelledSource("folders", images=str(root / "images"),
                                     masks=str(root / "masks")),
           "webdataset": LabelledSource("webdataset", input=str(root / "shards")),
           "parquet": LabelledSource("parquet", input=str(root / "parquet"))}[source]
    rows = read_labelled(src).take_all()
    want_keys = {"folders": [f"{p[0]}.jpg" for p in pairs],
                 "webdataset": [f"part-{i % 2}.tar/{p[0]}" for i, p in enumerate(pairs)],
                 "parquet": [p[0] for p in pairs]}[source]
    assert sorted(r["key"] for r in rows) == sorted(want_keys)
    by_stem = {posixpath.splitext(posixpath.basename(r["key"]))[0]: r for r in rows}
    for stem, image, mask in pairs:
        assert by_stem[stem]["image"] == image and by_stem[stem]["mask"] == mask


def test_holdout_split_is_disjoint_and_stable(ray_local, labelled):
    root, pairs = labelled
    src = LabelledSource("webdataset", input=str(root / "shards"))
    val = {r["key"] for r in read_labelled(src, holdout=Holdout(0.3, "val")).take_all()}
    train = {r["key"] for r in read_labelled(src, holdout=Holdout(0.3, "train")).take_all()}
    assert val and train and not val & train and len(val | train) == len(pairs)
    assert val == {k for k in val | train if stable_unit_interval(k) < 0.3}
    # Folders split on the driver, before reading: same rule on their keys.
    plan = plan_labelled(LabelledSource("folders", images=str(root / "images"),
                                        masks=str(root / "masks")))
    assert {u["key"] for u in plan.with_holdout(Holdout(0.3, "val")).units} == {
        u["key"] for u in plan.units if stable_unit_interval(u["key"]) < 0.3}


def test_minmax_changes_the_maps(labelled):
    # Guards the parametrised test above against a --normalize flag that does nothing.
    _, pairs = labelled
    assert direct_metrics(pairs, "minmax") != direct_metrics(pairs, "none")


def test_user_errors_are_one_line(tmp_path, capsys, labelled):
    root, _ = labelled
    (tmp_path / "empty").mkdir()
    common = ["--model", "u2netp", "--weights", str(WEIGHTS), "--input-size", str(INPUT_SIZE)]
    assert ev.main(["--images", str(tmp_path / "empty"), "--masks", str(root / "masks")]
                   + common) == 2
    assert "no images under" in capsys.readouterr().err
    assert ev.main(["--images", str(root / "images"), "--masks", str(root / "masks"),
                    "--model", "u2net", "--weights", str(WEIGHTS)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: weights from") and "\n" not in err
    assert ev.main(["--source", "webdataset", "--input", str(root / "shards"),
                    "--mask-member", "seg.png"] + common) == 2
    assert "no 'seg.png' member" in capsys.readouterr().err
