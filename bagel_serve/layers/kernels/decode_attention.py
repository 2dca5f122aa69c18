"""Paged decode attention over block tables (placeholder: native only)."""

from __future__ import annotations

import torch


def paged_decode_attention_native(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                                  scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device) if out is None else out
    for i, n in enumerate(context_lens.tolist()):
        if n == 0:
            out[i] = 0
            continue
        rows = torch.arange(n, device=q.device)
        slots = block_tables[i].long()[rows // block_size] * block_size + rows % block_size
        k = k_cache.index_select(0, slots).float().repeat_interleave(hq // hkv, dim=1)
        v = v_cache.index_select(0, slots).float().repeat_interleave(hq // hkv, dim=1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[i].float(), k) * scale, dim=-1)
        out[i] = torch.einsum("hn,nhd->hd", p, v).to(out.dtype)
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, block_size: int, scale: float, out: torch.Tensor | None = None,
                           num_splits: int | None = None) -> torch.Tensor:
    return paged_decode_attention_native(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, out)
