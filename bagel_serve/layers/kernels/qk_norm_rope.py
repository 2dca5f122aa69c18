"""Per-head q/k RMSNorm, RoPE and the K/V store of a merged QKV buffer (placeholder: native only)."""

from __future__ import annotations

import torch


def _norm_rope(x: torch.Tensor, w_und: torch.Tensor, w_gen: torch.Tensor, n_und: int, cos: torch.Tensor,
               sin: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    n = x.shape[0]
    if n_und >= n:
        h = w_und * h
    elif n_und <= 0:
        h = w_gen * h
    else:
        h = torch.cat([w_und * h[:n_und], w_gen * h[n_und:]])
    half = h.shape[-1] // 2
    rotated = torch.cat([-h[..., half:], h[..., :half]], dim=-1)
    return (h * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


def qk_norm_rope_native_(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, q_w_und: torch.Tensor,
                         k_w_und: torch.Tensor, q_w_gen: torch.Tensor, k_w_gen: torch.Tensor, n_und: int,
                         positions: torch.Tensor, inv_freq: torch.Tensor, eps: float,
                         k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                         slot_mapping: torch.Tensor | None = None) -> None:
    n = qkv.shape[0]
    qd, kd = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :qd].view(n, num_heads, head_dim)
    k = qkv[:, qd : qd + kd].view(n, num_kv_heads, head_dim)
    v = qkv[:, qd + kd :].view(n, num_kv_heads, head_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    q.copy_(_norm_rope(q, q_w_und, q_w_gen, n_und, cos, sin, eps))
    k.copy_(_norm_rope(k, k_w_und, k_w_gen, n_und, cos, sin, eps))
    if slot_mapping is not None:
        keep = (slot_mapping >= 0).nonzero().squeeze(1)
        slots = slot_mapping.index_select(0, keep)
        k_cache.index_copy_(0, slots, k.index_select(0, keep))
        v_cache.index_copy_(0, slots, v.index_select(0, keep))


def qk_norm_rope_(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, q_w_und: torch.Tensor,
                  k_w_und: torch.Tensor, q_w_gen: torch.Tensor, k_w_gen: torch.Tensor, n_und: int,
                  positions: torch.Tensor, inv_freq: torch.Tensor, eps: float, k_cache: torch.Tensor | None = None,
                  v_cache: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None) -> None:
    qk_norm_rope_native_(qkv, num_heads, num_kv_heads, head_dim, q_w_und, k_w_und, q_w_gen, k_w_gen, n_und,
                         positions, inv_freq, eps, k_cache, v_cache, slot_mapping)
