"""U²-Net and U²-Net† (u2netp), exactly as the official implementation defines them.

Qin et al., "U²-Net: Going Deeper with Nested U-Structure for Salient Object Detection", 2020.

Layout follows timm's model files: the building blocks first (REBNCONV, the residual U-blocks
RSU-L and RSU-4F), then the nested-U model, then builder functions. Module names and their
registration order reproduce the official state-dict keys one for one, so the official
checkpoints (`u2net.pth`, `u2netp.pth`, ...) load with `strict=True`.

One deliberate difference from the official code: `forward` returns *logits* (no sigmoid).
Training uses `BCEWithLogits` for numerical stability and inference applies the sigmoid where
it needs probabilities (`u2net_core.transforms`), so keeping the model linear at the output
serves both without computing the sigmoid twice.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["REBNCONV", "RSU", "RSU4F", "U2Net", "u2net", "u2netp", "MODEL_BUILDERS"]


def _upsample_like(src: torch.Tensor, tar: torch.Tensor) -> torch.Tensor:
    # Bilinear to the target's exact size (not a fixed ×2): with ceil_mode pooling, odd sizes
    # shrink to ceil(n/2), so only a size-matched resize makes the skip connections line up.
    return F.interpolate(src, size=tar.shape[2:], mode="bilinear", align_corners=False)


class REBNCONV(nn.Module):
    """3×3 (dilated) conv → BatchNorm → ReLU."""

    def __init__(self, in_ch: int = 3, out_ch: int = 3, dirate: int = 1) -> None:
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dirate, dilation=dirate)
        self.bn_s1 = nn.BatchNorm2d(out_ch)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_s1(self.bn_s1(self.conv_s1(x)))


class RSU(nn.Module):
    """Residual U-block RSU-L (the official RSU7, RSU6, RSU5 and RSU4 for L = 7, 6, 5, 4).

    Encoder: `rebnconvin` (in→out), `rebnconv1` (out→mid), then `rebnconv2..rebnconv{L-1}` each
    after a 2×2 ceil-mode max-pool (`pool1..pool{L-2}`), and `rebnconv{L}` (dilation 2) at the
    bottom. Decoder `rebnconv{L-1}d..rebnconv1d` on (deeper upsampled, skip) concatenations.
    Output is `hx1d + hxin`.
    """

    def __init__(self, height: int, in_ch: int = 3, mid_ch: int = 12, out_ch: int = 3) -> None:
        super().__init__()
        if height < 3:
            raise ValueError(f"RSU height must be >= 3, got {height}")
        self.height = height
        # Registration order matters: it is the order of the official state-dict keys.
        self.rebnconvin = REBNCONV(in_ch, out_ch, dirate=1)
        self.rebnconv1 = REBNCONV(out_ch, mid_ch, dirate=1)
        for i in range(1, height - 1):
            setattr(self, f"pool{i}", nn.MaxPool2d(2, stride=2, ceil_mode=True))
            setattr(self, f"rebnconv{i + 1}", REBNCONV(mid_ch, mid_ch, dirate=1))
        setattr(self, f"rebnconv{height}", REBNCONV(mid_ch, mid_ch, dirate=2))
        for i in range(height - 1, 1, -1):
            setattr(self, f"rebnconv{i}d", REBNCONV(mid_ch * 2, mid_ch, dirate=1))
        self.rebnconv1d = REBNCONV(mid_ch * 2, out_ch, dirate=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = self.height
        hxin = self.rebnconvin(x)
        skips = [self.rebnconv1(hxin)]  # hx1 .. hx{L-1}
        for i in range(1, L - 1):
            pooled = getattr(self, f"pool{i}")(skips[-1])
            skips.append(getattr(self, f"rebnconv{i + 1}")(pooled))
        hx = getattr(self, f"rebnconv{L}")(skips[-1])  # hxL, same resolution as hx{L-1}
        hx = getattr(self, f"rebnconv{L - 1}d")(torch.cat((hx, skips[L - 2]), 1))
        for i in range(L - 2, 0, -1):
            skip = skips[i - 1]
            hx = getattr(self, f"rebnconv{i}d")(torch.cat((_upsample_like(hx, skip), skip), 1))
        return hx + hxin


class RSU4F(nn.Module):
    """RSU-4F: the RSU-4 shape with dilations (1, 2, 4, 8 / 4, 2, 1) instead of pooling."""

    def __init__(self, in_ch: int = 3, mid_ch: int = 12, out_ch: int = 3) -> None:
        super().__init__()
        self.rebnconvin = REBNCONV(in_ch, out_ch, dirate=1)
        self.rebnconv1 = REBNCONV(out_ch, mid_ch, dirate=1)
        self.rebnconv2 = REBNCONV(mid_ch, mid_ch, dirate=2)
        self.rebnconv3 = REBNCONV(mid_ch, mid_ch, dirate=4)
        self.rebnconv4 = REBNCONV(mid_ch, mid_ch, dirate=8)
        self.rebnconv3d = REBNCONV(mid_ch * 2, mid_ch, dirate=4)
        self.rebnconv2d = REBNCONV(mid_ch * 2, mid_ch, dirate=2)
        self.rebnconv1d = REBNCONV(mid_ch * 2, out_ch, dirate=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        hx1 = self.rebnconv1(hxin)
        hx2 = self.rebnconv2(hx1)
        hx3 = self.rebnconv3(hx2)
        hx4 = self.rebnconv4(hx3)
        hx3d = self.rebnconv3d(torch.cat((hx4, hx3), 1))
        hx2d = self.rebnconv2d(torch.cat((hx3d, hx2), 1))
        hx1d = self.rebnconv1d(torch.cat((hx2d, hx1), 1))
        return hx1d + hxin


# (block, in, mid, out) per stage, from the paper's Table 1 and the official code.
_U2NET_STAGES = {
    "stage1": (7, 3, 32, 64),
    "stage2": (6, 64, 32, 128),
    "stage3": (5, 128, 64, 256),
    "stage4": (4, 256, 128, 512),
    "stage5": ("4F", 512, 256, 512),
    "stage6": ("4F", 512, 256, 512),
    "stage5d": ("4F", 1024, 256, 512),
    "stage4d": (4, 1024, 128, 256),
    "stage3d": (5, 512, 64, 128),
    "stage2d": (6, 256, 32, 64),
    "stage1d": (7, 128, 16, 64),
}
_U2NETP_STAGES = {
    "stage1": (7, 3, 16, 64),
    "stage2": (6, 64, 16, 64),
    "stage3": (5, 64, 16, 64),
    "stage4": (4, 64, 16, 64),
    "stage5": ("4F", 64, 16, 64),
    "stage6": ("4F", 64, 16, 64),
    "stage5d": ("4F", 128, 16, 64),
    "stage4d": (4, 128, 16, 64),
    "stage3d": (5, 128, 16, 64),
    "stage2d": (6, 128, 16, 64),
    "stage1d": (7, 128, 16, 64),
}
_ENCODER = ("stage1", "stage2", "stage3", "stage4", "stage5", "stage6")
_DECODER = ("stage5d", "stage4d", "stage3d", "stage2d", "stage1d")


def _make_block(spec: tuple, in_ch: int) -> nn.Module:
    height, _, mid, out = spec
    if height == "4F":
        return RSU4F(in_ch, mid, out)
    return RSU(height, in_ch, mid, out)


class U2Net(nn.Module):
    """The nested U: six encoder stages, five decoder stages, six side outputs and a fusion.

    `forward(x)` returns seven logit maps `(d0, d1, ..., d6)`, fused first, each
    N×out_ch×H×W at the input's size; any H and W work (not only multiples of 32).
    """

    def __init__(self, stages: dict, in_ch: int = 3, out_ch: int = 1) -> None:
        super().__init__()
        self.in_ch = in_ch
        self.out_ch = out_ch
        pools = {"stage1": "pool12", "stage2": "pool23", "stage3": "pool34",
                 "stage4": "pool45", "stage5": "pool56"}
        for name in _ENCODER:
            spec = stages[name]
            setattr(self, name, _make_block(spec, in_ch if name == "stage1" else spec[1]))
            if name in pools:
                setattr(self, pools[name], nn.MaxPool2d(2, stride=2, ceil_mode=True))
        for name in _DECODER:
            setattr(self, name, _make_block(stages[name], stages[name][1]))
        side_in = [stages[s][3] for s in ("stage1d", "stage2d", "stage3d", "stage4d", "stage5d", "stage6")]
        for i, c in enumerate(side_in, start=1):
            setattr(self, f"side{i}", nn.Conv2d(c, out_ch, 3, padding=1))
        self.outconv = nn.Conv2d(6 * out_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hx1 = self.stage1(x)
        hx2 = self.stage2(self.pool12(hx1))
        hx3 = self.stage3(self.pool23(hx2))
        hx4 = self.stage4(self.pool34(hx3))
        hx5 = self.stage5(self.pool45(hx4))
        hx6 = self.stage6(self.pool56(hx5))

        hx5d = self.stage5d(torch.cat((_upsample_like(hx6, hx5), hx5), 1))
        hx4d = self.stage4d(torch.cat((_upsample_like(hx5d, hx4), hx4), 1))
        hx3d = self.stage3d(torch.cat((_upsample_like(hx4d, hx3), hx3), 1))
        hx2d = self.stage2d(torch.cat((_upsample_like(hx3d, hx2), hx2), 1))
        hx1d = self.stage1d(torch.cat((_upsample_like(hx2d, hx1), hx1), 1))

        d1 = self.side1(hx1d)
        # Side maps are upsampled as logits, before the fusion, exactly as the official code.
        sides = [d1] + [
            _upsample_like(getattr(self, f"side{i}")(h), d1)
            for i, h in zip(range(2, 7), (hx2d, hx3d, hx4d, hx5d, hx6))
        ]
        d0 = self.outconv(torch.cat(sides, 1))
        return (d0, *sides)


def u2net(in_ch: int = 3, out_ch: int = 1) -> U2Net:
    """U²-Net: 44,009,869 parameters (176.3 MB fp32)."""
    return U2Net(_U2NET_STAGES, in_ch, out_ch)


def u2netp(in_ch: int = 3, out_ch: int = 1) -> U2Net:
    """U²-Net† ("u2netp"): 1,131,181 parameters (4.7 MB fp32)."""
    return U2Net(_U2NETP_STAGES, in_ch, out_ch)


MODEL_BUILDERS: dict[str, Callable[..., U2Net]] = {"u2net": u2net, "u2netp": u2netp}
