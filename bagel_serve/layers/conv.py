"""The VAE's convolution layer: `nn.Conv2d`'s parameters and names, the fused kernel's forward.

The state-dict keys stay FLUX's (`weight`, `bias`), so the published `ae.safetensors` loads as it is. On
the GPU the forward runs `kernels.conv` (float32 accuracy on tensor cores, with the nearest upsampling and
the residual add of the decoder fused in); elsewhere it is torch's convolution, which the CPU parity suite
holds to the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from bagel_serve.layers.kernels.conv import conv2d, pack_weight, supports, uses_kernel


class Conv2d(nn.Conv2d):
    """Square kernels with symmetric padding, stride 1, or stride 2 with the far edges' zero padding
    (FLUX's downsampling)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, upsample: int = 1) -> torch.Tensor:
        """`residual`: added to the output (`conv(x) + residual`); `upsample=2`: the convolution of x upsampled
        by nearest neighbours."""
        return conv2d(x, self.weight, self.bias, self.stride[0], self.padding[0], upsample, residual)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether `forward(x)` runs the fused kernel (callers that work around torch's memory use ask)."""
        return uses_kernel(x, self.weight)

    def process_weights_after_loading(self) -> None:
        """On the GPU, store the weight channels-last (the same values), the kernel's unit-stride layout."""
        if self.weight.is_cuda and supports(self.weight):
            self.weight.data = pack_weight(self.weight.data)
