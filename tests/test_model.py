"""The model is the official network: keys, shapes, parameter counts and outputs."""

import json
from pathlib import Path

import pytest
import torch

import u2net_core
from u2net_core import build_model
from tests import official_u2net

FIXTURES = Path(__file__).parent / "fixtures"


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and weights, so eval-mode outputs exercise every buffer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (0.1 if t.dim() > 1 else 0.2))


@pytest.mark.parametrize("name,params", [("u2net", 44_009_869), ("u2netp", 1_131_181)])
def test_keys_shapes_and_params_match_official(name, params):
    model = build_model(name)
    ref = json.loads((FIXTURES / f"keys_shapes_{name}.json").read_text())["entries"]
    mine = [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]
    assert mine == ref  # same keys, same order, same shapes: official .pth files load strictly
    assert sum(p.numel() for p in model.parameters()) == params
    assert u2net_core.get_spec(name).meta["params"] == params


def test_fixture_weights_reproduce_official_outputs():
    model = build_model("u2netp")
    sd = torch.load(FIXTURES / "u2netp_detweights.pth", weights_only=True)
    model.load_state_dict(sd, strict=True)
    model.eval()
    ref = torch.load(FIXTURES / "u2netp_reference_outputs.pt", weights_only=True)
    with torch.no_grad():
        out = model(ref["x"])
    assert len(out) == 7
    for mine, theirs in zip(out, ref["outputs"]):
        assert mine.shape == theirs.shape == (1, 1, 100, 140)
        torch.testing.assert_close(torch.sigmoid(mine), theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,official_cls,shape,train", [
    ("u2netp", official_u2net.U2NETP, (2, 3, 67, 45), False),
    ("u2netp", official_u2net.U2NETP, (1, 3, 33, 97), True),
    ("u2net", official_u2net.U2NET, (1, 3, 61, 83), False),
    ("u2net", official_u2net.U2NET, (2, 3, 32, 32), True),
])
def test_matches_literal_official_transcription(name, official_cls, shape, train):
    """Random weights (not the fixture), odd sizes, eval and train mode (batch statistics)."""
    ours = build_model(name)
    _randomize(ours, seed=sum(shape))
    theirs = official_cls()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.train(train)
    theirs.train(train)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        mine = ours(x)
        ref = theirs(x)
    for a, b in zip(mine, ref):
        assert a.shape == (shape[0], 1, shape[2], shape[3])
        torch.testing.assert_close(torch.sigmoid(a), b, atol=2e-5, rtol=0)


def test_gradients_flow_to_every_parameter():
    model = build_model("u2netp")
    out = model(torch.randn(2, 3, 64, 64))
    sum(o.mean() for o in out).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []


def test_out_channels_and_unknown_model():
    model = build_model("u2netp", out_ch=2).eval()
    assert all(o.shape[1] == 2 for o in model(torch.randn(1, 3, 32, 32)))
    with pytest.raises(ValueError, match="unknown model"):
        build_model("u2netx")
