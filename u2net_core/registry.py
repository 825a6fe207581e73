"""The model registry: what every job needs to know about a variant, in one place.

In the spirit of torchvision's weights API, a `ModelSpec` carries the builder together with the
input size and normalisation the model was trained with, plus its published metadata, so that
jobs never hard-code them. There are no downloadable weights here: users bring the official
`.pth` files or train their own (`jobs.train`), and load them with `u2net_core.load_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .model import u2net, u2netp

__all__ = ["ModelSpec", "MODELS", "get_spec", "build_model"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    input_size: int = 320
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    meta: dict[str, Any] = field(default_factory=dict)

    def build(self, *, in_ch: int = 3, out_ch: int = 1) -> nn.Module:
        return self.builder(in_ch=in_ch, out_ch=out_ch)


MODELS: dict[str, ModelSpec] = {
    "u2net": ModelSpec(
        name="u2net",
        builder=u2net,
        meta={
            "params": 44_009_869,
            "size_mb_fp32": 176.3,
            # 2 × conv MACs at 1×3×320×320 (DESIGN §1).
            "gflops_320": 117.2,
            "paper": {"DUTS-TE": {"max_f": 0.873, "mae": 0.044}, "fps_1080ti": 30},
            "official_checkpoints": ["u2net.pth", "u2net_human_seg.pth", "u2net_portrait.pth"],
        },
    ),
    "u2netp": ModelSpec(
        name="u2netp",
        builder=u2netp,
        meta={
            "params": 1_131_181,
            "size_mb_fp32": 4.7,
            "gflops_320": 39.5,
            "paper": {"DUTS-TE": {"max_f": 0.852, "mae": 0.054}, "fps_1080ti": 40},
            "official_checkpoints": ["u2netp.pth"],
        },
    ),
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None


def build_model(name: str, *, in_ch: int = 3, out_ch: int = 1) -> nn.Module:
    """Build a freshly initialised U²-Net variant (`"u2net"` or `"u2netp"`)."""
    return get_spec(name).build(in_ch=in_ch, out_ch=out_ch)
