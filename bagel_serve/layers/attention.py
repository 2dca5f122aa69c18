"""The attention of one decoder layer over the paged KV cache.

New rows' K/V are already in the cache when this runs: the fused norm-RoPE prologue
(`kernels.qk_norm_rope`) stores every committed row at its `slot_mapping` slot. For a packed forward whose
backend `prepacks`, that prologue also writes the queries and the new keys and values straight into the
packed buffers `packed_rows` allocates. What is left is reading:
the one-token decode steps of all sequences attend together through their block tables, every other
sequence (a prompt, an image block, a denoising step) attends over its cached rows plus its new ones.
Which kernels do that is the backend's business (`attention_backends`), picked once by the runner.
"""

from __future__ import annotations

import torch
from torch import nn

from bagel_serve.layers.fp8 import SplitRows
from bagel_serve.layers.forward_context import get_forward_context
from bagel_serve.layers.kernels.gather import PackedQKV
from bagel_serve.layers.kernels.quant import empty_rows


class Attention(nn.Module):
    """Layer `layer_index`'s attention; its head geometry is the shapes of the q, k, v it is given. `fp8`: its
    large denoising sequences run FP8 attention (`layers.fp8_attention`; set by the loader)."""

    def __init__(self, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.fp8 = False

    def cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's (keys, values) cache views, [slots, kv heads, head dim] each."""
        kv = get_forward_context().kv_cache
        return kv[self.layer_index, 0], kv[self.layer_index, 1]

    def packed_rows(self, rows: int, heads: int, kv_heads: int, head_dim: int, like: torch.Tensor
                    ) -> PackedQKV | None:
        """Buffers for this forward's queries, keys and values in the packed order, when its backend takes
        them so (`AttentionBackend.prepacks`); None otherwise."""
        ctx = get_forward_context()
        p = ctx.packed
        if p is None or p.kv_rows is None or p.kv_rows.numel() != rows or not ctx.backend.prepacks(p, self.fp8):
            return None
        q = torch.empty((p.q_rows.numel(), heads, head_dim), dtype=like.dtype, device=like.device)
        k = torch.empty((p.k_rows, kv_heads, head_dim), dtype=like.dtype, device=like.device)
        return PackedQKV(q, k, torch.empty_like(k), p.inv_rows, p.kv_rows)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, quant_und: bool = False,
                quant_gen: bool = False, rows: PackedQKV | None = None) -> torch.Tensor | SplitRows:
        """q (rows, Hq, D), k/v (rows, Hkv, D) -> (rows, Hq, D); or, when an output projection is FP8
        (`quant_und`, `quant_gen`) and the backend writes a packed forward's rows straight into its input, each
        expert's rows [n, Hq * D] (e4m3 + scales for an FP8 one) as `SplitRows`. With `rows` (from
        `packed_rows`, filled by the QK-norm/RoPE kernel) q, k and v give only their shapes."""
        ctx = get_forward_context()
        k_cache, v_cache = self.cache()
        p = ctx.packed
        if (quant_und or quant_gen) and p is not None and p.inv_rows is not None \
                and p.inv_rows.numel() == q.shape[0]:
            n_und, width = min(max(ctx.n_und, 0), q.shape[0]), q.shape[1] * q.shape[2]
            head = empty_rows(n_und, width, q, quant_und)
            tail = empty_rows(q.shape[0] - n_und, width, q, quant_gen)
            if ctx.backend.packed_split(q, k, v, p, k_cache, v_cache, head, tail, self.fp8, rows):
                return SplitRows(head, tail)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if ctx.decode is not None and ctx.decode.n:
            n = ctx.decode.n
            ctx.backend.decode(q[:n], k_cache, v_cache, ctx.decode, out[:n])
        if ctx.packed is not None:
            ctx.backend.packed(q, k, v, ctx.packed, k_cache, v_cache, out, rows)
        for seq in ctx.sequences:
            ctx.backend.sequence(q, k, v, seq, k_cache, v_cache, out, self.fp8)
        return out
