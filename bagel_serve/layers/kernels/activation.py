"""SiLU(gate) * up of a merged gate-up projection (placeholder: native only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_native(x: torch.Tensor) -> torch.Tensor:
    i = x.shape[-1] // 2
    return F.silu(x[..., :i]) * x[..., i:]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return silu_and_mul_native(x)
