"""Lower-precision model modes stay within a measured fidelity bound of fp32 on a trained model,
and the precision a run uses is chosen, hashed and planned as documented.

The weights are U²-Net† trained by `make demo` on make_dataset data (tests/fixtures/README.md);
the images are make_dataset samples from a seed it was not trained on. The bounds are the ones
BENCHMARKS.md records, with margin; a mode that cannot meet them must stay off by default.
"""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bench.precision_fidelity import calibration_set, eval_set, fidelity, map_stats

WEIGHTS = Path(__file__).parent / "fixtures" / "u2netp_synth_trained.pth"
SIZE, COUNT, CALIBRATION_COUNT = 96, 16, 16

# Bounds on the uint8 maps (mean |Δ| in grey levels) and on the dataset metrics, per mode.
BOUNDS = {
    "bf16": {"mean_abs_diff_u8": 1.0, "delta_mae": 0.005, "delta_max_f": 0.01},
    "int8": {"mean_abs_diff_u8": 2.0, "delta_mae": 0.005, "delta_max_f": 0.01},
}


@pytest.fixture(scope="module")
def report():
    """fp32 (the reference) and bf16 in this process. int8 is measured through the job
    (`test_infer_job_int8_within_bound`): compiling it costs minutes on 2 cores, once is enough."""
    return fidelity(str(WEIGHTS), model="u2netp", input_size=SIZE, count=COUNT,
                    modes=("fp32", "bf16"))


def _assert_within(got: dict, bound: dict) -> None:
    assert got["mean_abs_diff_u8"] <= bound["mean_abs_diff_u8"], got
    assert abs(got["delta_mae"]) <= bound["delta_mae"], got
    assert abs(got["delta_max_f"]) <= bound["delta_max_f"], got
    assert got["pixels_differing"] > 0  # it really ran in another precision


def test_bf16_within_bound(report):
    _assert_within(report["modes"]["bf16"], BOUNDS["bf16"])


def test_default_precision_is_auto():
    from pipeline.config import ModelConfig

    assert ModelConfig().precision == "auto"


@pytest.mark.parametrize("requested,device,native,expected", [
    ("auto", "cpu", True, "bf16"),   # AMX / AVX512-BF16
    ("auto", "cpu", False, "fp32"),  # bf16 would be emulated, slower than fp32
    ("auto", "cuda", True, "bf16"),  # Ampere and newer
    ("auto", "cuda", False, "fp16"),  # older cards
    ("fp32", "cuda", True, "fp32"),
    ("bf16", "cpu", False, "bf16"),  # asked for explicitly: honoured
    ("int8", "cpu", True, "int8"),
])
def test_choose_precision(requested, device, native, expected):
    from u2net_core.runtime import choose_precision

    assert choose_precision(requested, device, native) == expected


def test_int8_is_cpu_only():
    from pipeline.config import ModelConfig
    from pipeline.predict import plan_actors
    from u2net_core.runtime import choose_precision

    with pytest.raises(ValueError, match="x86 CPUs only"):
        choose_precision("int8", "cuda", True)
    with pytest.raises(ValueError, match="CPU actors only"):
        plan_actors(ModelConfig(precision="int8"), {"CPU": 16, "GPU": 2})
    assert plan_actors(ModelConfig(precision="int8"), {"CPU": 16}).device == "cpu"


def test_compiled_and_int8_models_need_a_fixed_batch():
    from u2net_core import build_model
    from u2net_core.runtime import InferenceModel

    with pytest.raises(ValueError, match="fixed_batch"):
        InferenceModel(build_model("u2netp"), "cpu", "fp32", compile=True)
    with pytest.raises(ValueError, match="calibration"):
        InferenceModel(build_model("u2netp"), "cpu", "int8", fixed_batch=2)


def _write_images(folder: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(folder / f"c{i}.png")


def test_model_id_depends_on_precision_and_calibration(tmp_path):
    from pipeline.config import MaskPipelineConfig, ModelConfig, SourceConfig
    from pipeline.processor import read_weights

    _write_images(tmp_path / "calib_a", 8, seed=1)
    _write_images(tmp_path / "calib_b", 8, seed=2)
    _write_images(tmp_path / "too_few", 3, seed=3)

    def model_id(**model):
        cfg = MaskPipelineConfig(SourceConfig(str(tmp_path)),
                                 ModelConfig(name="u2netp", weights=str(WEIGHTS), input_size=64,
                                             **model))
        return read_weights(cfg).model_id

    ids = {model_id(precision="fp32"), model_id(precision="bf16"), model_id(precision="auto"),
           model_id(precision="int8", calibration=str(tmp_path / "calib_a")),
           model_id(precision="int8", calibration=str(tmp_path / "calib_b"))}
    assert len(ids) == 5
    # Same settings, same id; how the model is run (batch, compile) is not part of it.
    assert model_id(precision="fp32") == model_id(precision="fp32", batch_size=3, compile=True)
    with pytest.raises(ValueError, match="calibration"):
        model_id(precision="int8")
    from pipeline.storage import StorageError
    with pytest.raises(StorageError, match="at least 8"):
        model_id(precision="int8", calibration=str(tmp_path / "too_few"))


def test_infer_job_int8_within_bound(ray_local, report, tmp_path, capsys):
    """`--precision int8 --calibration` through the real job, and the int8 bound enforced on
    the job's own masks: the calibration set reaches the actors through the object store, the
    quantised model runs compiled, every key lands once, and the masks table is within the
    bound of the in-process fp32 maps of the same images."""
    from jobs import infer

    _, files, gts = eval_set(COUNT, SIZE)
    (tmp_path / "in").mkdir()
    for i, data in enumerate(files):
        (tmp_path / "in" / f"e{i:02d}.jpg").write_bytes(data)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (tmp_path / "calib").mkdir()
    for i, data in enumerate(calibration_set(CALIBRATION_COUNT, SIZE)[1]):
        (tmp_path / "calib" / f"c{i:02d}.jpg").write_bytes(data)
    rc = infer.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                     "--model", "u2netp", "--weights", str(WEIGHTS), "--input-size", str(SIZE),
                     "--batch-size", "8", "--actors", "1", "--precision", "int8",
                     "--calibration", str(tmp_path / "calib")])
    assert rc == 0
    summary = json.loads((tmp_path / "out" / "_run.json").read_text())
    assert (summary["masks"], summary["errors"]) == (COUNT, 1)
    assert summary["settings"]["model"]["precision"] == "int8"

    rows = pq.read_table(tmp_path / "out" / "masks", columns=["key", "prob_map"]).to_pylist()
    by_key = {r["key"]: np.frombuffer(r["prob_map"], np.uint8).reshape(SIZE, SIZE) for r in rows}
    maps = np.stack([by_key[f"e{i:02d}.jpg"] for i in range(COUNT)])
    fp32 = report["modes"]["fp32"]
    got = map_stats(maps, report["maps"]["fp32"], gts)
    got.update(delta_mae=got["mae"] - fp32["mae"], delta_max_f=got["max_f"] - fp32["max_f"])
    _assert_within(got, BOUNDS["int8"])

    rc = infer.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out2"),
                     "--model", "u2netp", "--weights", str(WEIGHTS), "--precision", "int8"])
    assert rc == 2 and "--calibration" in capsys.readouterr().err
