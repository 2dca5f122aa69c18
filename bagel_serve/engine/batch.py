"""Packing many sequences into one LLM forward.

A forward takes a flat batch of token rows from many sequences (requests, CFG branches). Rows are
ordered experts-first: every understanding row (text, ViT tokens, image-boundary tokens) of every
sequence, then every generation row (VAE latents). A sequence therefore owns one understanding range
and, for a VAE/latent block, one generation range; attention runs per sequence over its context's
cached rows plus its own new rows. Image blocks attend fully, so the order of their new keys (the
boundary tokens sit beside, not around, their latents) does not change the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bagel_serve.engine.kv_cache import Context
from bagel_serve.layers.attention import attend
from bagel_serve.engine.tokenizer import SpecialTokens
from bagel_serve.layers.rotary import inv_frequencies, rope_tables
from bagel_serve.model.bagel import Bagel


@dataclass
class TextPiece:
    """Text tokens (causal), e.g. `<|im_start|> … <|im_end|>` or one decode token."""

    ids: torch.Tensor


@dataclass
class VitPiece:
    """A ViT image block: patches of one image, bracketed by vision start/end tokens."""

    patches: torch.Tensor
    position_ids: torch.Tensor


@dataclass
class LatentPiece:
    """A VAE latent block (clean conditioning image at t=0, or the image being denoised)."""

    latents: torch.Tensor
    t: float
    position_ids: torch.Tensor


Piece = TextPiece | VitPiece | LatentPiece


def und_rows(piece: Piece) -> int:
    """Rows of a piece that the understanding expert runs (a latent block's two boundary tokens)."""
    if isinstance(piece, TextPiece):
        return piece.ids.shape[0]
    if isinstance(piece, VitPiece):
        return piece.patches.shape[0] + 2
    return 2


def gen_rows(piece: Piece) -> int:
    """Rows of a piece that the generation expert runs (latent tokens)."""
    return piece.latents.shape[0] if isinstance(piece, LatentPiece) else 0


@dataclass
class SeqSpec:
    context: Context
    piece: Piece
    commit: bool


@dataclass
class _Seq:
    context: Context
    segments: list[tuple[int, int]]
    causal: bool
    commit: bool
    rope_advance: int
    out_rows: list[int] = field(default_factory=list)


class ForwardBatch:
    """The packed batch of one forward; decoder layers call `attend` on it."""

    def __init__(self, seqs: list[_Seq], n_und: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.seqs = seqs
        self.n_und = n_und
        self.cos = cos
        self.sin = sin

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        for s in self.seqs:
            if len(s.segments) == 1:
                a, n = s.segments[0]
                k_new, v_new = k[a : a + n], v[a : a + n]
            else:
                k_new = torch.cat([k[a : a + n] for a, n in s.segments])
                v_new = torch.cat([v[a : a + n] for a, n in s.segments])
            keys, values = s.context.attend_keys(layer, k_new, v_new, s.commit)
            for a, n in s.segments:
                out[a : a + n] = attend(q[a : a + n], keys, values, s.causal)
        return out


class Packer:
    """Builds the embeddings and metadata of one forward from per-sequence pieces."""

    def __init__(self, model: Bagel, special: SpecialTokens) -> None:
        self.model = model
        self.special = special
        cfg = model.config.llm
        self.inv_freq = inv_frequencies(cfg.head_dim, cfg.rope_theta, model.device)

    def run(self, specs: list[SeqSpec]) -> tuple[torch.Tensor, ForwardBatch, list[_Seq]]:
        """Run the LLM over the packed pieces; returns final hidden rows (experts-first order)."""
        model, dev = self.model, self.model.device
        und_parts: list[torch.Tensor] = []
        und_pos: list[torch.Tensor] = []
        gen_parts: list[torch.Tensor] = []
        gen_pos: list[torch.Tensor] = []
        seqs: list[_Seq] = []
        n_und = sum(und_rows(s.piece) for s in specs)
        u = g = 0
        # Latent rows of all sequences share one embedding call; collect them first.
        lat = [s.piece for s in specs if isinstance(s.piece, LatentPiece)]
        if lat:
            x = torch.cat([p.latents for p in lat]).to(dev)
            t = torch.tensor([p.t for p in lat], dtype=torch.float32, device=dev)
            pos_ids = torch.cat([p.position_ids for p in lat]).to(dev)
            gen_emb = model.embed_latents(x, t, [p.latents.shape[0] for p in lat], pos_ids)
        vit = [s.piece for s in specs if isinstance(s.piece, VitPiece)]
        if vit:
            vit_emb = model.embed_vit(
                torch.cat([p.patches for p in vit]).to(dev),
                torch.cat([p.position_ids for p in vit]).to(dev),
                [p.patches.shape[0] for p in vit],
            )
        vit_off = 0
        boundary = torch.tensor([self.special.start_of_image, self.special.end_of_image], device=dev)
        for spec in specs:
            ctx, piece = spec.context, spec.piece
            if spec.commit:
                ctx.reserve(und_rows(piece) + gen_rows(piece))
            if isinstance(piece, TextPiece):
                n = piece.ids.shape[0]
                und_parts.append(model.embed_text(piece.ids.to(dev)))
                und_pos.append(torch.arange(ctx.rope, ctx.rope + n, device=dev))
                seqs.append(_Seq(ctx, [(u, n)], True, spec.commit, n))
                u += n
            elif isinstance(piece, VitPiece):
                m = piece.patches.shape[0]
                ends = model.embed_text(boundary)
                und_parts += [ends[:1], vit_emb[vit_off : vit_off + m], ends[1:]]
                vit_off += m
                und_pos.append(torch.full((m + 2,), ctx.rope, device=dev))
                seqs.append(_Seq(ctx, [(u, m + 2)], False, spec.commit, 1))
                u += m + 2
            else:
                m = piece.latents.shape[0]
                und_parts.append(model.embed_text(boundary))
                und_pos.append(torch.full((2,), ctx.rope, device=dev))
                gen_pos.append(torch.full((m,), ctx.rope, device=dev))
                seqs.append(_Seq(ctx, [(u, 2), (n_und + g, m)], False, spec.commit, 1))
                u += 2
                g += m
        if lat:
            gen_parts.append(gen_emb)
        x = torch.cat(und_parts + gen_parts).to(model.dtype)
        positions = torch.cat(und_pos + gen_pos)
        cos, sin = rope_tables(positions, self.inv_freq)
        batch = ForwardBatch(seqs, n_und, cos, sin)
        hidden = model.transformer(x, batch)
        for s in seqs:
            if s.commit:
                s.context.commit(s.rope_advance)
        return hidden, batch, seqs
