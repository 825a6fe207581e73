"""Checkpoint loading: official layout, DDP prefixes, wrappers, old torch, mismatches, fsspec."""

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from u2net_core import build_model, load_weights, save_weights, WeightsMismatchError
from u2net_core.checkpoint import read_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
DET = FIXTURES / "u2netp_detweights.pth"


def _same(a: torch.nn.Module, b: dict) -> bool:
    return all(torch.equal(v, b[k]) for k, v in a.state_dict().items() if k in b)


def test_official_file_loads_strictly_from_path_and_uri(tmp_path):
    ref = torch.load(DET, weights_only=True)
    assert _same(load_weights(build_model("u2netp"), DET), ref)
    assert _same(load_weights(build_model("u2netp"), f"file://{DET}"), ref)
    assert _same(load_weights(build_model("u2netp"), ref), ref)


@pytest.mark.parametrize("wrap", [
    lambda sd: OrderedDict((f"module.{k}", v) for k, v in sd.items()),
    lambda sd: {"model": sd, "epoch": 3},
    lambda sd: {"state_dict": OrderedDict((f"module.{k}", v) for k, v in sd.items())},
    lambda sd: OrderedDict((f"_orig_mod.{k}", v) for k, v in sd.items()),
    lambda sd: OrderedDict((k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")),
])
def test_foreign_layouts_load(tmp_path, wrap):
    ref = torch.load(DET, weights_only=True)
    path = tmp_path / "w.pth"
    torch.save(wrap(ref), path)
    model = load_weights(build_model("u2netp"), path)
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref
               if not k.endswith("num_batches_tracked"))


def test_mismatch_names_keys():
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(build_model("u2net"), DET)  # u2netp weights into u2net
    assert "shape mismatches" in str(err.value) and "stage1.rebnconv1.conv_s1.weight" in str(err.value)
    sd = torch.load(DET, weights_only=True)
    sd.pop("outconv.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsMismatchError, match=r"missing keys: outconv\.bias.*unexpected keys: extra\.weight"):
        load_weights(build_model("u2netp"), sd)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        read_state_dict(path)


def test_save_weights_round_trip_official_layout(tmp_path):
    model = build_model("u2netp")
    ddp_like = OrderedDict((f"module.{k}", v) for k, v in model.state_dict().items())
    save_weights(ddp_like, tmp_path / "out.pth")
    loaded = torch.load(tmp_path / "out.pth", weights_only=True)
    assert list(loaded) == list(model.state_dict())
    from tests import official_u2net
    official_u2net.U2NETP().load_state_dict(loaded, strict=True)  # the official code reads it
