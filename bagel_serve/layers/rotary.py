"""Rotary position embedding (Qwen2 "default" RoPE, rotate-half convention).

BAGEL gives every token one scalar position and a whole image block a single shared position, so angles
come from each row's own position id, never from a table cached by sequence offset: the fused QK-norm/RoPE
kernel (`kernels.qk_norm_rope`) computes them per row in the forward. This module is the definition that
kernel follows: the inverse frequencies (built as the reference builds them), and the float32 tables and
rotation its plain-torch twin applies.
"""

from __future__ import annotations

import torch


def inv_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    # Built in float32 on the CPU exactly as the reference does, then moved.
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return (1.0 / (theta**exponent)).to(device)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (rows, head_dim), float32."""
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (rows, heads, head_dim); cos/sin: (rows, head_dim), same dtype as x."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
