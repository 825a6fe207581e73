"""Lower-precision model modes stay within a measured fidelity bound of fp32 on a trained model.

The weights are U²-Net† trained by `make demo` on make_dataset data (tests/fixtures/README.md);
the images are make_dataset samples from a seed it was not trained on. The bounds are the ones
BENCHMARKS.md records, with margin; a mode that cannot meet them must stay off by default.
"""

from pathlib import Path

import pytest

from bench.precision_fidelity import fidelity

WEIGHTS = Path(__file__).parent / "fixtures" / "u2netp_synth_trained.pth"

# bf16 autocast on CPU: bounds on the uint8 maps and on the dataset metrics.
BF16_MEAN_ABS_DIFF_U8 = 1.0
BF16_DELTA_MAE = 0.005
BF16_DELTA_MAX_F = 0.01


@pytest.fixture(scope="module")
def report():
    return fidelity(str(WEIGHTS), model="u2netp", input_size=96, count=16)


def test_bf16_within_bound(report):
    bf16 = report["modes"]["bf16"]
    assert bf16["mean_abs_diff_u8"] <= BF16_MEAN_ABS_DIFF_U8, bf16
    assert abs(bf16["delta_mae"]) <= BF16_DELTA_MAE, bf16
    assert abs(bf16["delta_max_f"]) <= BF16_DELTA_MAX_F, bf16


def test_default_precision_is_fp32():
    from pipeline.config import ModelConfig

    assert ModelConfig().precision == "fp32"
