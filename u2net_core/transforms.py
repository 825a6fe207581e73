"""Pre- and post-processing of the official code, as plain functions: one place each.

Preprocessing (official `RescaleT` + `ToTensorLab(flag=0)`): resize to S×S ignoring the aspect
ratio, divide by the image's own maximum, then ImageNet mean/std per channel. Grayscale images
use channel 0's constants on all three channels. The resize happens at decode time
(`u2net_core.imageio`), so what travels between pipeline stages is S×S uint8, 4× smaller than
float32; `normalize` finishes the job on the batch, on whichever device runs the model.

Postprocessing: sigmoid of the fused logits, optionally min–max normalised per image (the
official `normPRED`, kept for parity with the official tool and rembg, but not the default:
it stretches noise into a mask on images with no salient object), then a uint8 map.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "normalize", "probabilities", "quantize_map", "to_uint8_map",
           "NormalizeMode"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NormalizeMode = Literal["none", "minmax"]


def normalize(images: torch.Tensor | np.ndarray, gray: Sequence[bool] | np.ndarray | torch.Tensor | None = None,
              mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 N×S×S×3 images → normalised N×3×S×S float tensor (channels-last memory).

    `gray[i]` marks images that were single-channel at the source: the official code normalises
    those with channel 0's mean and std on all three channels. An all-black image has max 0;
    the official code divides by zero there (NaN masks), we divide by 1 instead.
    """
    x = torch.as_tensor(images)
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected N×H×W×3 images, got shape {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).to(dtype)  # NHWC storage viewed as NCHW: channels_last for free
    peak = x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1.0)
    x = x / peak
    m = torch.tensor(mean, dtype=dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=x.device).view(1, 3, 1, 1)
    if gray is not None:
        if isinstance(gray, torch.Tensor):  # e.g. already on the GPU beside the images
            g = gray.to(device=x.device, dtype=torch.bool)
        else:
            g = torch.as_tensor(np.asarray(gray, dtype=bool), device=x.device)
        g = g.view(-1, 1, 1, 1)
        m = torch.where(g, m[:, :1], m)
        s = torch.where(g, s[:, :1], s)
    return (x - m) / s


def probabilities(logits: torch.Tensor, mode: NormalizeMode = "none") -> torch.Tensor:
    """Fused logits N×1×H×W (or N×H×W) → probabilities N×H×W in [0, 1] (float32).

    `mode="minmax"` is the official `normPRED`: (p − min) / (max − min) per image. A constant
    map (max == min) becomes all zeros instead of the official NaN.
    """
    p = torch.sigmoid(logits.float())
    if p.dim() == 4:
        p = p[:, 0]
    if mode == "minmax":
        lo = p.amin(dim=(1, 2), keepdim=True)
        hi = p.amax(dim=(1, 2), keepdim=True)
        span = hi - lo
        p = torch.where(span > 0, (p - lo) / span.clamp_min(1e-12), torch.zeros_like(p))
    elif mode != "none":
        raise ValueError(f"normalize mode must be 'none' or 'minmax', got {mode!r}")
    return p


def quantize_map(prob: torch.Tensor) -> torch.Tensor:
    """Probabilities in [0, 1] → uint8 maps on the same device (rounded, so p ≥ 0.5 ⇔
    value ≥ 128)."""
    return torch.round(prob.clamp(0, 1) * 255).to(torch.uint8)


def to_uint8_map(prob: torch.Tensor) -> np.ndarray:
    """`quantize_map`, as a host numpy array."""
    return quantize_map(prob).cpu().numpy()
