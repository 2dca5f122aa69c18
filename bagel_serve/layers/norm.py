"""RMSNorm in the Qwen2 convention (statistics in float32, the normalised value rounded to the input dtype
before the weight multiply), optionally over the MoT row split and with the residual add fused in."""

from __future__ import annotations

import torch
from torch import nn

from bagel_serve.layers.kernels.rms_norm import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, eps=self.eps)[0]


def expert_rms_norm(x: torch.Tensor, n_und: int, und: RMSNorm, gen: RMSNorm,
                    residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows [0, n_und) normalised with `und`'s weight, the rest with `gen`'s; with `residual`, the norm is of
    `residual + x`, which is returned as the new residual."""
    return rms_norm(x, und.weight, gen.weight, n_und, und.eps, residual)
