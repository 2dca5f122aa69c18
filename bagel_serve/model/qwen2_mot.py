"""The Qwen2 mixture-of-transformers LLM of BAGEL, as pure math over the layers.

Every layer holds two full parameter sets: the understanding expert (the original Qwen2 names) and the
generation expert (`*_moe_gen`). There is no router: a forward's rows [0, n_und) are understanding rows
(text, ViT tokens, image-boundary tokens) and the rest generation rows (VAE latents), and each expert runs
as plain GEMMs on its range (`layers.mot`). Attention is shared: both experts' Q/K/V meet in one attention
over the paged cache. Everything a forward needs beyond its rows comes from the forward context.

Q/K/V and gate/up are merged projections (`layers.linear`) whose loaders take the checkpoint's separate
`q_proj`/`k_proj`/`v_proj` and `gate_proj`/`up_proj` tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from bagel_serve.config.model_config import LLMConfig
from bagel_serve.layers.attention import Attention
from bagel_serve.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from bagel_serve.layers.forward_context import get_forward_context
from bagel_serve.layers.kernels.qk_norm_rope import qk_norm_rope_
from bagel_serve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from bagel_serve.layers.mot import Rows, expert_linear, expert_mlp
from bagel_serve.layers.norm import RMSNorm, expert_rms_norm
from bagel_serve.layers.rotary import inv_frequencies


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate, intermediate], ["gate_proj", "up_proj"])
        self.down_proj = RowParallelLinear(intermediate, hidden)


class MoTAttention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_index: int) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        for suffix in ("", "_moe_gen"):
            setattr(self, f"qkv_proj{suffix}", QKVParallelLinear(
                h, d, cfg.num_attention_heads, cfg.num_key_value_heads, bias=True,
                sources=(f"q_proj{suffix}", f"k_proj{suffix}", f"v_proj{suffix}")))
            setattr(self, f"o_proj{suffix}", RowParallelLinear(cfg.num_attention_heads * d, h))
            setattr(self, f"q_norm{suffix}", RMSNorm(d, cfg.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", RMSNorm(d, cfg.rms_norm_eps))
        self.num_heads = self.qkv_proj.num_heads  # this rank's heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = d
        self.eps = cfg.rms_norm_eps
        self.attn = Attention(layer_index)

    def forward(self, x: Rows, inv_freq: torch.Tensor) -> torch.Tensor:
        """`x`: the normed rows, as a tensor or per expert in the form its QKV projection takes (`layers.fp8`)."""
        ctx = get_forward_context()
        n, nh, nkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = expert_linear(x, ctx.n_und, self.qkv_proj, self.qkv_proj_moe_gen)
        # QK-norm in float32 (the reference's generation-mode precision) and RoPE, in place or into the packed
        # attention's buffers; committed rows' K/V go into the cache here.
        caches = self.attn.cache() if ctx.slot_mapping is not None else (None, None)
        rows = self.attn.packed_rows(n, nh, nkv, d, qkv)
        qk_norm_rope_(qkv, nh, nkv, d, self.q_norm.weight, self.k_norm.weight, self.q_norm_moe_gen.weight,
                      self.k_norm_moe_gen.weight, ctx.n_und, ctx.positions, inv_freq, self.eps, *caches,
                      ctx.slot_mapping, rows)
        q = qkv[:, : nh * d].view(n, nh, d)
        k = qkv[:, nh * d : (nh + nkv) * d].view(n, nkv, d)
        v = qkv[:, (nh + nkv) * d :].view(n, nkv, d)
        out = self.attn(q, k, v, self.o_proj.wants_fp8_input, self.o_proj_moe_gen.wants_fp8_input, rows)
        if isinstance(out, torch.Tensor):
            out = out.view(n, nh * d)
        return expert_linear(out, ctx.n_und, self.o_proj, self.o_proj_moe_gen, reduce=True)


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.self_attn = MoTAttention(cfg, index)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_moe_gen = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, inv_freq: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm residual block; `residual` carries the stream, `x` this block's pending addition."""
        n = get_forward_context().n_und
        # Each norm hands its rows to the projections it feeds in the form they take (e4m3 for FP8 ones).
        qkv = (self.self_attn.qkv_proj, self.self_attn.qkv_proj_moe_gen)
        gate_up = (self.mlp.gate_up_proj, self.mlp_moe_gen.gate_up_proj)
        if residual is None:
            h, _ = expert_rms_norm(x, n, self.input_layernorm, self.input_layernorm_moe_gen, feeds=qkv)
            residual = x
        else:
            h, residual = expert_rms_norm(x, n, self.input_layernorm, self.input_layernorm_moe_gen, residual, qkv)
        h = self.self_attn(h, inv_freq)
        h, residual = expert_rms_norm(h, n, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen,
                                      residual, gate_up)
        return expert_mlp(h, n, self.mlp, self.mlp_moe_gen), residual


class Qwen2MoTModel(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self._inv_freq: torch.Tensor | None = None

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """RoPE inverse frequencies (built in float32 on the CPU as the reference does), kept on `device`."""
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = inv_frequencies(self.config.head_dim, self.config.rope_theta, device)
        return self._inv_freq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden rows after the last block, before the final (per-expert) norm, which the heads apply."""
        inv_freq = self.inv_freq(x.device)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, inv_freq)
        return residual + x


class Qwen2MoTForCausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen2MoTModel(cfg)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size)
