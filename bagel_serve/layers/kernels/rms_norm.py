"""RMSNorm over a mixture-of-experts row split, with the residual add fused in (placeholder: native only)."""

from __future__ import annotations

import torch


def rms_norm_native(x: torch.Tensor, w_und: torch.Tensor, w_gen: torch.Tensor | None = None, n_und: int | None = None,
                    eps: float = 1e-6, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if residual is not None:
        x = residual + x
    h = x.float()
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if w_gen is None or n_und is None or n_und >= x.shape[0]:
        out = w_und * h
    elif n_und <= 0:
        out = w_gen * h
    else:
        out = torch.empty_like(h)
        torch.mul(w_und, h[:n_und], out=out[:n_und])
        torch.mul(w_gen, h[n_und:], out=out[n_und:])
    return out, (x if residual is not None else None)


def rms_norm(x: torch.Tensor, w_und: torch.Tensor, w_gen: torch.Tensor | None = None, n_und: int | None = None,
             eps: float = 1e-6, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    return rms_norm_native(x, w_und, w_gen, n_und, eps, residual)
