"""The Qwen2 mixture-of-transformers LLM of BAGEL.

Every layer holds two full parameter sets: the understanding expert (the original Qwen2 names) and the
generation expert (`*_moe_gen`). There is no router: a forward's rows are ordered so that understanding
rows (text, ViT tokens, image-boundary tokens) come first and generation rows (VAE latent tokens) last,
and each expert runs as plain GEMMs on its contiguous range. Attention is shared: both experts' Q/K/V
meet in one attention per sequence, which the forward batch object performs (it knows the contexts).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from bagel_serve.config.model_config import LLMConfig
from bagel_serve.layers.norm import RMSNorm
from bagel_serve.layers.rotary import apply_rope


class AttentionBatch(Protocol):
    """What a decoder layer needs from the packed batch it runs on."""

    n_und: int
    cos: torch.Tensor
    sin: torch.Tensor

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def split_experts(
    x: torch.Tensor, n_und: int, und: Callable[[torch.Tensor], torch.Tensor], gen: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply `und` to rows [0, n_und) and `gen` to the rest."""
    if n_und == x.shape[0]:
        return und(x)
    if n_und == 0:
        return gen(x)
    return torch.cat([und(x[:n_und]), gen(x[n_und:])])


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoTAttention(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        kv = cfg.num_key_value_heads * d
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(h, h, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(h, kv, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(h, kv, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(h, h, bias=False))
            setattr(self, f"q_norm{suffix}", RMSNorm(d, cfg.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", RMSNorm(d, cfg.rms_norm_eps))

    def _qkv(self, x: torch.Tensor, gen: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = "_moe_gen" if gen else ""
        rows = x.shape[0]
        q = getattr(self, f"q_proj{s}")(x).view(rows, self.num_heads, self.head_dim)
        k = getattr(self, f"k_proj{s}")(x).view(rows, self.num_kv_heads, self.head_dim)
        v = getattr(self, f"v_proj{s}")(x).view(rows, self.num_kv_heads, self.head_dim)
        # QK-norm in float32 (the reference's generation-mode precision), cast back after RoPE.
        q = getattr(self, f"q_norm{s}")(q.float())
        k = getattr(self, f"k_norm{s}")(k.float())
        return q, k, v

    def forward(self, x: torch.Tensor, batch: AttentionBatch, layer: int) -> torch.Tensor:
        n = batch.n_und
        parts = [self._qkv(x[:n], False)] if n else []
        if n < x.shape[0]:
            parts.append(self._qkv(x[n:], True))
        q, k, v = (torch.cat(t) if len(t) > 1 else t[0] for t in zip(*parts))
        q = apply_rope(q, batch.cos, batch.sin).to(x.dtype)
        k = apply_rope(k, batch.cos, batch.sin).to(x.dtype)
        out = batch.attend(layer, q, k, v).reshape(x.shape[0], -1)
        return split_experts(out, n, self.o_proj, self.o_proj_moe_gen)


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.self_attn = MoTAttention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_moe_gen = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        n = batch.n_und
        h = split_experts(x, n, self.input_layernorm, self.input_layernorm_moe_gen)
        x = x + self.self_attn(h, batch, self.index)
        h = split_experts(
            x,
            n,
            lambda t: self.mlp(self.post_attention_layernorm(t)),
            lambda t: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(t)),
        )
        return x + h


class Qwen2MoTModel(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, batch)
        return split_experts(x, batch.n_und, self.norm, self.norm_moe_gen)


class Qwen2MoTForCausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen2MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
