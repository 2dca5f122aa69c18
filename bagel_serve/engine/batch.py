"""Packing many sequences into one LLM forward.

A forward takes a flat batch of token rows from many sequences (requests, CFG branches). Rows are
ordered experts-first: every understanding row (text, ViT tokens, image-boundary tokens) of every
sequence, then every generation row (VAE latents). A sequence therefore owns one understanding range
and, for a VAE/latent block, one generation range; attention runs per sequence over its context's
cached rows plus its own new rows. Image blocks attend fully, so the order of their new keys (the
boundary tokens sit beside, not around, their latents) does not change the result.
"""

from __future__ import annotations

import math
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


class _DecodeGroup:
    """One-token causal steps of many sequences (text decoding) run as one attention.

    Per sequence, attention would be a handful of tiny kernels per layer, and with dozens of sequences
    decoding the step is launch-bound. Here the new K/V rows are scattered into the pool and every
    sequence's rows gathered into a padded batch (one index op per pool slab, indices built once per
    forward), then one masked grouped-query attention serves them all, softmax in float32. Rows land in
    the pool exactly where `attend_keys` would put them.
    """

    def __init__(self, seqs: list[_Seq], device: torch.device) -> None:
        self.seqs = seqs
        self.pool = seqs[0].context.pool
        lens = [s.context.length + 1 for s in seqs]
        self.lmax = max(lens)
        self.rows = torch.tensor([s.segments[0][0] for s in seqs], device=device)
        slabs, srows, dsts = [], [], []
        for i, (s, n) in enumerate(zip(seqs, lens)):
            sl, r = s.context.slab_rows(n)
            slabs.append(sl)
            srows.append(r)
            dsts.append(torch.arange(n) + i * self.lmax)
        slab, srow, dst = torch.cat(slabs), torch.cat(srows), torch.cat(dsts)
        self.reads = [(sid, srow[m].to(device), dst[m].to(device))
                      for sid in slab.unique().tolist() for m in [slab == sid]]
        last = torch.tensor(lens).cumsum(0) - 1  # where each sequence's new row sits in those lists
        wslab, wrow = slab[last], srow[last]
        self.writes = [(sid, wrow[m].to(device), m.nonzero().squeeze(1).to(device))
                       for sid in wslab.unique().tolist() for m in [wslab == sid]]
        self.mask = (torch.arange(self.lmax)[None, :] < torch.tensor(lens)[:, None]).to(device)
        for s in seqs:
            s.context.wrote(1)

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        pool, b, lmax = self.pool, len(self.seqs), self.lmax
        kn, vn = k[self.rows].to(pool.dtype), v[self.rows].to(pool.dtype)
        hkv, d = kn.shape[1], kn.shape[2]
        for sid, dst, which in self.writes:
            pool._kl[sid][layer].index_copy_(0, dst, kn[which])
            pool._vl[sid][layer].index_copy_(0, dst, vn[which])
        kp = torch.empty((b * lmax, hkv, d), dtype=pool.dtype, device=q.device)
        vp = torch.zeros((b * lmax, hkv, d), dtype=pool.dtype, device=q.device)  # padding must not be NaN
        for sid, src, dst in self.reads:
            kp.index_copy_(0, dst, pool._kl[sid][layer].index_select(0, src))
            vp.index_copy_(0, dst, pool._vl[sid][layer].index_select(0, src))
        hq = q.shape[1]
        qg = q[self.rows].view(b, hkv, hq // hkv, d).float()
        scores = torch.matmul(qg, kp.view(b, lmax, hkv, d).permute(0, 2, 3, 1).float()) / math.sqrt(d)
        scores.masked_fill_(~self.mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.matmul(probs, vp.view(b, lmax, hkv, d).permute(0, 2, 1, 3).float())
        out[self.rows] = o.reshape(b, hq, d).to(out.dtype)


MAX_PADDED_DECODE_ROWS = 1 << 18
"""Padded K/V rows one decode group may gather (sequences x longest context): bounds its transient memory
(about 1.5 GiB at BAGEL's 4 KV heads of 128 in bf16, float32 copies included)."""


class ForwardBatch:
    """The packed batch of one forward; decoder layers call `attend` on it.

    With `batch_decode`, the one-token causal steps of two or more sequences on one pool attend together,
    in groups (`_DecodeGroup`) of similar context lengths that stay within MAX_PADDED_DECODE_ROWS; every
    other sequence attends alone."""

    def __init__(self, seqs: list[_Seq], n_und: int, cos: torch.Tensor, sin: torch.Tensor,
                 batch_decode: bool = False) -> None:
        self.seqs = seqs
        self.n_und = n_und
        self.cos = cos
        self.sin = sin
        self.decode: list[_DecodeGroup] = []
        self.alone = seqs
        if batch_decode:
            steps = [s for s in seqs if s.causal and s.commit and len(s.segments) == 1 and s.segments[0][1] == 1]
            steps = [s for s in steps if s.context.pool is steps[0].context.pool] if steps else []
            if len(steps) >= 2:
                self.decode = [_DecodeGroup(g, cos.device) for g in _by_length(steps)]
                grouped = {id(s) for s in steps}
                self.alone = [s for s in seqs if id(s) not in grouped]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        for group in self.decode:
            group.run(layer, q, k, v, out)
        for s in self.alone:
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


def _by_length(steps: list[_Seq]) -> list[list[_Seq]]:
    """Decode steps in groups of similar context length (little padding), each within the row bound."""
    groups: list[list[_Seq]] = []
    for s in sorted(steps, key=lambda s: s.context.length):
        n = s.context.length + 1
        if groups and (len(groups[-1]) + 1) * n <= MAX_PADDED_DECODE_ROWS:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


class Packer:
    """Builds the embeddings and metadata of one forward from per-sequence pieces."""

    def __init__(self, model: Bagel, special: SpecialTokens) -> None:
        self.model = model
        self.special = special
        cfg = model.config.llm
        self.inv_freq = inv_frequencies(cfg.head_dim, cfg.rope_theta, model.device)
        # Batched decode attention on CUDA; the CPU keeps the exact per-sequence path the parity tests hold.
        self.batch_decode = model.device.type == "cuda"

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
        batch = ForwardBatch(seqs, n_und, cos, sin, self.batch_decode)
        hidden = model.transformer(x, batch)
        for s in seqs:
            if s.commit:
                s.context.commit(s.rope_advance)
        return hidden, batch, seqs
