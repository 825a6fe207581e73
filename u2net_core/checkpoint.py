"""Checkpoint I/O: load official and foreign U²-Net state dicts, save ours in the official layout.

Every load goes through `torch.load(..., weights_only=True)`: a checkpoint is data, and a
pickle that can run code has no business in a pipeline that loads weights from object storage.
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from typing import Any, Mapping, Union

import torch
from torch import nn

__all__ = ["read_state_dict", "filter_state_dict", "load_weights", "save_weights",
           "WeightsMismatchError"]

StateDictSource = Union[str, os.PathLike, Mapping[str, Any]]

# Wrappers that training frameworks put around a state dict, checked in this order.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
# Prefixes added by DDP (`module.`) and torch.compile (`_orig_mod.`).
_PREFIXES = ("module.", "_orig_mod.")


class WeightsMismatchError(RuntimeError):
    """The checkpoint does not fit the model; the message names the keys that differ."""


def _open_binary(source: str | os.PathLike) -> bytes:
    path = os.fspath(source)
    if "://" in path:
        import fsspec  # local paths need no fsspec; remote URIs (s3://, gs://, ...) do

        with fsspec.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def read_state_dict(source: StateDictSource) -> dict[str, torch.Tensor]:
    """Read a state dict from a local path, an fsspec URI or an in-memory mapping (unfiltered)."""
    if isinstance(source, Mapping):
        return dict(source)
    data = _open_binary(source)
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise WeightsMismatchError(f"{os.fspath(source)!r} does not hold a state dict "
                                   f"(found {type(obj).__name__})")
    return dict(obj)


def filter_state_dict(state_dict: Mapping[str, Any], model: nn.Module | None = None
                      ) -> "OrderedDict[str, torch.Tensor]":
    """Bring a foreign U²-Net state dict into the official key layout.

    Unwraps `{"model": ...}` / `{"state_dict": ...}` containers, strips `module.` and
    `_orig_mod.` prefixes, and, when `model` is given, fills in `num_batches_tracked` buffers that
    checkpoints saved with torch 0.4 (the official ones) do not have: they only matter for
    BatchNorm with momentum=None, which U²-Net does not use.
    """
    sd: Mapping[str, Any] = state_dict
    for _ in range(3):  # nested wrappers, e.g. {"model": {"state_dict": ...}}
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            continue  # e.g. an optimizer step counter stored beside the weights
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    if model is not None:
        for key, buf in model.state_dict().items():
            if key.endswith("num_batches_tracked") and key not in out:
                out[key] = torch.zeros_like(buf)
    return out


def load_weights(model: nn.Module, source: StateDictSource) -> nn.Module:
    """Load weights strictly into `model` and return it.

    `source`: a local path, an fsspec URI (`s3://bucket/u2net.pth`) or a state dict. Accepts the
    official checkpoints unchanged, DDP's `module.` prefix, checkpoints without
    `num_batches_tracked`, and dicts wrapping the weights under "model" or "state_dict".
    Raises `WeightsMismatchError` naming the missing and unexpected keys and any shape mismatch.
    """
    sd = filter_state_dict(read_state_dict(source), model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong_shape = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                   for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        def _fmt(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt(unexpected)}")
        if wrong_shape:
            parts.append(f"shape mismatches: {_fmt(wrong_shape)}")
        name = source if not isinstance(source, Mapping) else "the given state dict"
        raise WeightsMismatchError(f"weights from {name} do not fit {type(model).__name__}: "
                                   + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
    return model


def save_weights(model_or_state: nn.Module | Mapping[str, torch.Tensor],
                 dest: str | os.PathLike) -> None:
    """Save a plain state dict in the official key layout (local path or fsspec URI).

    Prefixes from DDP or torch.compile are stripped and tensors moved to CPU, so the official
    code, `load_weights` and `torch.load(weights_only=True)` all read the file.
    """
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    clean = OrderedDict((k, v.detach().cpu().contiguous())
                        for k, v in filter_state_dict(sd).items())
    buf = io.BytesIO()
    torch.save(clean, buf)
    path = os.fspath(dest)
    if "://" in path:
        import fsspec

        with fsspec.open(path, "wb") as f:
            f.write(buf.getvalue())
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)  # readers never see a half-written file
