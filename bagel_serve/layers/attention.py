"""One attention call over one sequence: new queries against their keys (context + own new keys).

Every forward in the engine is a packed batch of sequences; the batch object slices each sequence out
and calls `attend` here, so the kernel choice lives in one place. Causal masks are aligned to the
bottom-right (query i of q_len new tokens sees the whole context plus new tokens 0..i), as flash-attn's
varlen kernels do in the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """q: (Lq, Hq, D); k, v: (Lk, Hkv, D) with Lk >= Lq; returns (Lq, Hq, D) in q's dtype."""
    if q.device.type == "cpu":
        return _attend_exact(q, k, v, causal)
    return _attend_sdpa(q, k, v, causal)


def _attend_exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Float32 explicit softmax: the path our parity tests hold to the reference."""
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    qf = q.float().transpose(0, 1)  # (Hq, Lq, D)
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(qf, kf.transpose(1, 2)) / math.sqrt(d)
    if causal and lq > 1:
        offset = lk - lq
        allowed = torch.arange(lk)[None, :] <= (torch.arange(lq)[:, None] + offset)
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vf).transpose(0, 1).to(q.dtype)


def _attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    lq, lk = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if causal and lq > 1:
        # The causal-bias path does not take grouped KV heads, so expand them (prefill only).
        group = q.shape[1] // k.shape[1]
        kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(lq, lk))
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)
