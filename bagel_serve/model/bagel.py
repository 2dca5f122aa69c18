"""The BAGEL module: its children carry the checkpoint's key prefixes, its methods embed each kind of
token and read each head. Every stage (context prefill, text decode, denoising) calls these; none of
them re-implements the math."""

from __future__ import annotations

import torch
from torch import nn

from bagel_serve.config.model_config import BagelConfig
from bagel_serve.model.embeddings import MLPConnector, PositionEmbedding, TimestepEmbedder
from bagel_serve.model.qwen2_mot import Qwen2MoTForCausalLM
from bagel_serve.model.siglip import SiglipVisionModel


class Bagel(nn.Module):
    def __init__(self, cfg: BagelConfig) -> None:
        super().__init__()
        self.config = cfg
        h = cfg.llm.hidden_size
        self.language_model = Qwen2MoTForCausalLM(cfg.llm)
        self.vit_model = SiglipVisionModel(cfg.vit)
        self.connector = MLPConnector(cfg.vit.hidden_size, h)
        self.vit_pos_embed = PositionEmbedding(cfg.vit_max_num_patch_per_side, h)
        self.time_embedder = TimestepEmbedder(h)
        self.vae2llm = nn.Linear(cfg.patch_latent_dim, h)
        self.llm2vae = nn.Linear(h, cfg.patch_latent_dim)
        self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, h)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vae2llm.weight.device

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)

    def embed_vit(self, patches: torch.Tensor, position_ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """ViT features of packed images, mapped into the LLM width with their 2-D position table."""
        feats = self.vit_model(patches.to(self.dtype), position_ids, lengths)
        return self.connector(feats) + self.vit_pos_embed(position_ids)

    def embed_latents(self, x: torch.Tensor, t: torch.Tensor, counts: list[int], position_ids: torch.Tensor,
                      repeats: torch.Tensor | None = None) -> torch.Tensor:
        """Latent tokens: vae2llm(x) + time embedding + 2-D table.

        `t` holds one flow time per image and `counts` its token count (`repeats`: the same counts as a tensor
        on the device, when the caller has it there): the time MLP runs once per image, not once per token.
        """
        if repeats is None:
            repeats = torch.tensor(counts, device=t.device)
        temb = self.time_embedder(t).repeat_interleave(repeats, dim=0, output_size=sum(counts))
        return (self.vae2llm(x.to(self.dtype)) + temb) + self.latent_pos_embed(position_ids)

    def transformer(self, x: torch.Tensor) -> torch.Tensor:
        """The LLM over the rows of the current forward context (hidden rows before the final norm)."""
        return self.language_model.model(x)

    def lm_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of understanding rows (final norm of the understanding expert, then the LM head)."""
        return self.language_model.lm_head(self.language_model.model.norm(hidden), out=out)

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        """Velocity of generation rows (final norm of the generation expert, then llm2vae)."""
        return self.llm2vae(self.language_model.model.norm_moe_gen(hidden))
