"""RMSNorm in the Qwen2 convention (statistics in float32, the normalised value rounded to the input dtype
before the weight multiply), optionally over the MoT row split and with the residual add fused in.

A norm that feeds a pair of linears (`feeds`) asks them how they want their rows: when one of them is an
FP8 layer, its rows leave the norm kernel already quantised (e4m3 + a scale per row, `layers.fp8`), and the
result is a `SplitRows` the MoT pair slices per expert. Otherwise the result is the plain tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from bagel_serve.layers.fp8 import SplitRows
from bagel_serve.layers.kernels.rms_norm import rms_norm, rms_norm_quant
from bagel_serve.layers.linear import LinearBase


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, eps=self.eps)[0]


def expert_rms_norm(x: torch.Tensor, n_und: int, und: RMSNorm, gen: RMSNorm, residual: torch.Tensor | None = None,
                    feeds: tuple[LinearBase, LinearBase] | None = None
                    ) -> tuple[torch.Tensor | SplitRows, torch.Tensor | None]:
    """Rows [0, n_und) normalised with `und`'s weight, the rest with `gen`'s; with `residual`, the norm is of
    `residual + x`, which is returned as the new residual. `feeds`: the (und, gen) linears the result goes
    into, whose quant methods decide whether their rows come out as e4m3."""
    if feeds is not None and (feeds[0].wants_fp8_input or feeds[1].wants_fp8_input):
        head, tail, residual = rms_norm_quant(x, und.weight, gen.weight, n_und, und.eps, residual,
                                              feeds[0].wants_fp8_input, feeds[1].wants_fp8_input)
        return SplitRows(head, tail), residual
    return rms_norm(x, und.weight, gen.weight, n_und, und.eps, residual)
