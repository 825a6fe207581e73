"""u2net_core: the U²-Net model, its checkpoints, transforms, loss and metrics. No Ray here.

Public API:
    build_model(name)                 -> a freshly initialised "u2net" or "u2netp"
    load_weights(model, source)       -> strict load of official / DDP / wrapped checkpoints
    save_weights(model, dest)         -> plain state dict in the official key layout
    get_spec(name), MODELS            -> input size, normalisation and metadata per variant
    deep_supervision_loss(logits, y)  -> (total, fused) as in the paper
    decode_image(bytes, size)         -> S×S uint8 model input, EXIF-oriented
    normalize / probabilities / to_uint8_map   -> the official pre/post-processing
    SODMetrics                        -> MAE, F-measure, E-measure, S-measure, weighted F
"""

from __future__ import annotations

import importlib

# Imported on first use: a process that only decodes images or encodes masks (Ray's read,
# decode and postprocess workers import `u2net_core.imageio` / `.masks`) does not pay for
# torch, about 124 MiB of private memory per process (BENCHMARKS.md, memory).
_EXPORTS = {
    "WeightsMismatchError": "checkpoint", "load_weights": "checkpoint",
    "read_state_dict": "checkpoint", "save_weights": "checkpoint",
    "DecodedImage": "imageio", "ImageDecodeError": "imageio", "decode_image": "imageio",
    "decode_mask": "imageio",
    "deep_supervision_loss": "loss",
    "SODMetrics": "metrics",
    "U2Net": "model", "u2net": "model", "u2netp": "model",
    "MODELS": "registry", "ModelSpec": "registry", "build_model": "registry", "get_spec": "registry",
    "normalize": "transforms", "probabilities": "transforms", "to_uint8_map": "transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'u2net_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
