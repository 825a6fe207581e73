"""Deep-supervision loss of the paper: the sum of seven mean BCE terms (fused map + six sides).

The official code applies BCE to sigmoid outputs; computing it on logits with
`binary_cross_entropy_with_logits` gives the same value without the log(0) overflow of a
saturated sigmoid, and is autocast-safe under fp16/bf16.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["deep_supervision_loss"]


def deep_supervision_loss(logits: Sequence[torch.Tensor], target: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(total, fused)`: the sum of the 7 mean BCE terms, and the fused map's term alone.

    `logits`: the model's outputs `(d0, d1, ..., d6)`, each N×1×H×W. `target`: N×1×H×W (or N×H×W)
    in [0, 1]; soft labels are allowed. Every term has weight 1, as in the paper.
    """
    if target.dim() == logits[0].dim() - 1:
        target = target.unsqueeze(1)
    target = target.to(dtype=torch.float32)
    terms = [F.binary_cross_entropy_with_logits(d.float(), target) for d in logits]
    return torch.stack(terms).sum(), terms[0]
