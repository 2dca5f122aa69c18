"""CUDA graphs of the denoising forward, for the small images whose steps the host cannot keep up with.

At 512x512 a guided step (two CFG branches of 1,026 rows) keeps an H200 busy about 38 ms, but launching it
eagerly — 28 layers of some 40 kernels, Triton's and cuBLAS's — takes the host about 48 ms: the step is
host-bound. A graph replays the whole forward (latent and boundary embeddings, every layer, the final norm and
the velocity head) in one launch. At 1024x1024 the device takes four times longer and the host hides behind
it, so larger images run eagerly (a stage's `denoise_graph_sizes`, 512x512 by default).

What a graph freezes, and what it takes as input. A graph is captured per `Bucket`: latent rows per branch,
number of branches, and the capacity of cached keys over all branches. That fixes the row layout and with it
the expert split (every branch two understanding rows — its boundary tokens — then its latents, run by the
generation expert), so a graph never replays rows under the wrong expert. Everything else is an input
copied in before each replay: which context each branch reads (its cache slots) and how many keys that is,
RoPE positions, latents, flow times and token ids. Which CFG branches a step runs is only which contexts it
passes: a one-, two- or three-branch step picks the bucket of that many branches. Attention goes through the
backend's packed varlen call, whose lengths are read on the device (`PackedAttention`), and the graph path
packs exactly as the eager path does, so a replay gives the eager forward's numbers.

Every bucket is captured at start (`capture`, its seconds and memory reported), into the memory pool the
decode graphs share; no request pays for a capture. The contexts' keys are copied into a buffer of the graphs'
before each replay (a few rows of every layer for a prompt), so a graph serves contexts of any KV cache.
Outputs are copied out of the static buffers, so nothing a request keeps (TaylorSeer's cached rows) is
overwritten by the next replay.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import torch

from bagel_serve.config.deploy import DEFAULT_DENOISE_GRAPH_SIZES
from bagel_serve.config.model_config import BagelConfig
from bagel_serve.engine.kv_cache import KVCache
from bagel_serve.engine.sequence import Work
from bagel_serve.engine.tokenizer import SpecialTokens
from bagel_serve.layers.attention_backends import AttentionBackend, PackedAttention, pack_sequences
from bagel_serve.layers.forward_context import ForwardContext, forward_context
from bagel_serve.model.bagel import Bagel
from bagel_serve.model.layout import LatentPiece, latent_grid


BRANCH_COUNTS = (1, 2, 3)
"""A step evaluates one (unguided), two (text2img guided) or three (img2img guided) CFG branches."""
CONTEXT_BUCKETS = (256, 1024, 2048)
"""Capacities of cached keys over a step's branches: a prompt's contexts fill the smallest, a long prompt or a
thinking plan the others; an edited 512x512 image's three (its ViT and VAE tokens twice, the prompt) are about
5,000 keys, and run eagerly."""


def graph_sizes(sizes: tuple[tuple[int, int], ...] | None, cfg: BagelConfig) -> tuple[tuple[int, int], ...]:
    """The image sizes a stage captures: its `denoise_graph_sizes` (checked against the model at start), or
    for None the default sizes this model generates."""
    if sizes is not None:
        return sizes
    return tuple(s for s in DEFAULT_DENOISE_GRAPH_SIZES if max(s) <= cfg.max_image_side)


@dataclass(frozen=True)
class Bucket:
    latents: int
    """Latent rows of each branch."""
    branches: int
    context: int
    """Cached keys of all branches together, at most."""

    @property
    def und(self) -> int:
        return 2 * self.branches

    @property
    def gen(self) -> int:
        return self.latents * self.branches

    @property
    def rows(self) -> int:
        return self.und + self.gen


class DenoiseGraphs:
    """The denoising forward's graphs of one model runner (its model, KV cache, attention backend, special
    tokens and graph pool), over static buffers sized for its largest bucket."""

    def __init__(self, model: Bagel, cache: KVCache, backend: AttentionBackend, special: SpecialTokens,
                 pool: Any, sizes: tuple[tuple[int, int], ...]) -> None:
        self.model, self.backend, self.special, self.pool = model, backend, special, pool
        cfg = model.config
        latents = sorted({gh * gw for gh, gw in (latent_grid(h, w, cfg.latent_downsample) for h, w in sizes)})
        self.buckets = [Bucket(n, b, c) for n in latents for b in BRANCH_COUNTS for c in CONTEXT_BUCKETS]
        top = max(self.buckets, key=lambda b: (b.rows, b.context))
        rows, gen, branches, cap = top.rows, top.gen, max(BRANCH_COUNTS), max(CONTEXT_BUCKETS)
        dev = model.device
        # int64 inputs, one buffer: token ids, RoPE positions, latent position ids, packed-attention indices.
        spans = dict(ids=rows, positions=rows, lat_pos=gen, repeats=branches, q_rows=rows, inv_rows=rows,
                     new_dst=rows, ctx_slots=cap, ctx_dst=cap)
        self._offsets = dict(zip(spans, itertools.accumulate(spans.values(), initial=0)))
        self.ints = torch.zeros(sum(spans.values()), dtype=torch.int64, device=dev)
        self._ints = torch.zeros_like(self.ints, device="cpu").pin_memory()
        # The contexts' keys and values, every layer's, gathered here before each replay: the graph reads them
        # from this buffer, never from a cache, so it serves contexts of any cache — this stage's own, or the
        # one a Thinker lends a DiT in place, which is mapped only at the first hand-off.
        layers, _, _, kv_heads, head_dim = cache.tensor.shape
        self.context_kv = torch.zeros((cap, layers, 2, kv_heads, head_dim), dtype=cache.tensor.dtype, device=dev)
        self.context_rows = torch.arange(cap, device=dev)
        self.cu = torch.zeros((2, branches + 1), dtype=torch.int32, device=dev)
        self._cu = torch.zeros_like(self.cu, device="cpu").pin_memory()
        self.t = torch.zeros(branches, dtype=torch.float32, device=dev)
        self._t = torch.zeros_like(self.t, device="cpu").pin_memory()
        self.latents = torch.zeros((gen, cfg.patch_latent_dim), dtype=torch.float32, device=dev)
        self.velocity = torch.zeros((gen, cfg.patch_latent_dim), dtype=torch.float32, device=dev)
        self.hidden = torch.zeros((gen, cfg.llm.hidden_size), dtype=model.dtype, device=dev)
        self._staged = torch.cuda.Event()
        """Recorded after the copies out of the pinned staging buffers: they are not rewritten before it passed."""
        self.graphs: dict[Bucket, torch.cuda.CUDAGraph] = {}
        self.capture_s = 0.0
        self.memory_bytes = 0

    def _view(self, buf: torch.Tensor, name: str, n: int) -> torch.Tensor:
        """The first n values of input `name` in the int64 buffer `buf` (device or staging)."""
        start = self._offsets[name]
        return buf[start : start + n]

    # ------------------------------------------------------------------ which forwards
    def bucket(self, works: list[Work]) -> Bucket | None:
        """The bucket of a forward that is only denoising steps of one latent size (each work a branch), with
        room for its cached keys; None for any other forward."""
        if not works or len(works) not in BRANCH_COUNTS:
            return None
        pieces = [w.piece for w in works]
        if not all(isinstance(p, LatentPiece) for p in pieces) or any(w.commit or not w.want_output for w in works):
            return None
        n = pieces[0].latents.shape[0]
        if any(p.latents.shape[0] != n for p in pieces):
            return None
        cached = sum(w.context.length for w in works)
        for c in CONTEXT_BUCKETS:
            b = Bucket(n, len(works), c)
            if cached <= c and b in self.graphs:
                return b
        return None

    # ------------------------------------------------------------------ capture and replay
    def _body(self, b: Bucket) -> None:
        """The forward of bucket b over the static buffers (what each graph captures)."""
        m, n = self.model, b.branches
        ids, positions = self._view(self.ints, "ids", b.und), self._view(self.ints, "positions", b.rows)
        x = m.embed_text(ids)
        gen = m.embed_latents(self.latents[: b.gen], self.t[:n], [b.latents] * n,
                              self._view(self.ints, "lat_pos", b.gen), self._view(self.ints, "repeats", n))
        x = torch.cat([x, gen.to(x.dtype)])
        packed = PackedAttention(self._view(self.ints, "q_rows", b.rows), self.cu[0, : n + 1], b.latents + 2,
                                 self.context_rows[: b.context], self._view(self.ints, "ctx_dst", b.context),
                                 self._view(self.ints, "new_dst", b.rows), self.cu[1, : n + 1],
                                 b.context + b.latents + 2, b.context + b.rows + 1,
                                 self._view(self.ints, "inv_rows", b.rows))
        kv = self.context_kv[: b.context].permute(1, 2, 0, 3, 4)  # [layers, 2, keys, kv heads, head dim], as a cache
        with forward_context(ForwardContext(b.und, positions, None, kv, self.backend, None, [], packed)):
            hidden = m.transformer(x)
        gen_hidden = hidden[b.und :]
        self.hidden[: b.gen].copy_(gen_hidden)
        self.velocity[: b.gen].copy_(m.velocity(gen_hidden).float())

    def _stage(self, b: Bucket, ids: list[int], positions: torch.Tensor, lat_pos: torch.Tensor, t: list[float],
               ctx_slots: list[torch.Tensor | None]) -> None:
        """Write a forward's inputs into the pinned staging buffers and copy them up (asynchronously)."""
        self._staged.synchronize()  # the last copies may still be reading the staging buffers
        n = b.branches
        q_rows = [torch.cat([torch.arange(2 * i, 2 * i + 2), torch.arange(b.und + i * b.latents,
                                                                          b.und + (i + 1) * b.latents)])
                  for i in range(n)]
        f = pack_sequences(q_rows, ctx_slots, b.context)
        values = dict(ids=torch.tensor(ids), positions=positions, lat_pos=lat_pos,
                      repeats=torch.full((n,), b.latents), q_rows=f["q_rows"], inv_rows=f["inv_rows"],
                      new_dst=f["new_dst"],
                      ctx_slots=f["ctx_src"], ctx_dst=f["ctx_dst"])
        for name, v in values.items():
            self._view(self._ints, name, v.numel()).copy_(v)
        self._cu[0, : n + 1] = f["cu_q"]
        self._cu[1, : n + 1] = f["cu_k"]
        self._t[:n] = torch.tensor(t)
        self.ints.copy_(self._ints, non_blocking=True)
        self.cu.copy_(self._cu, non_blocking=True)
        self.t.copy_(self._t, non_blocking=True)
        self._staged.record(torch.cuda.current_stream(self.model.device))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, into the graph pool (each after one eager run of the same
        inputs, which compiles its kernels and settles the allocator)."""
        torch.cuda.synchronize()
        t0, free0 = time.perf_counter(), torch.cuda.mem_get_info()[0]
        special = self.special
        for b in sorted(self.buckets, key=lambda b: (b.rows, b.context), reverse=True):
            self._stage(b, [special.start_of_image, special.end_of_image] * b.branches,
                        torch.zeros(b.rows, dtype=torch.int64), torch.zeros(b.gen, dtype=torch.int64),
                        [1.0] * b.branches, [None] * b.branches)
            self._body(b)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self._body(b)
            self.graphs[b] = g
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0
        self.memory_bytes = max(0, free0 - torch.cuda.mem_get_info()[0])

    def run(self, works: list[Work], und_ids: list[int], positions: torch.Tensor, b: Bucket) -> list[Any]:
        """Replay bucket b for the works (their rows' token ids and RoPE positions as the runner laid them out);
        each work's velocity (with `want_hidden`: and its hidden rows), copies of the graph's outputs."""
        pieces = [w.piece for w in works]
        slots = [w.context.slots(0, w.context.length) if w.context.length else None for w in works]
        self._stage(b, und_ids, positions, torch.cat([p.position_ids for p in pieces]),
                    [p.t for p in pieces], slots)
        cached = sum(w.context.length for w in works)
        if cached:
            cache = works[0].context.cache.tensor.permute(2, 0, 1, 3, 4)  # [slots, layers, 2, kv heads, head dim]
            torch.index_select(cache, 0, self._view(self.ints, "ctx_slots", cached), out=self.context_kv[:cached])
        for i, p in enumerate(pieces):
            self.latents[i * b.latents : (i + 1) * b.latents].copy_(p.latents, non_blocking=True)
        self.graphs[b].replay()
        velocity, hidden = self.velocity[: b.gen].clone(), None
        if any(w.want_hidden for w in works):
            hidden = self.hidden[: b.gen].clone()
        out: list[Any] = []
        for i, w in enumerate(works):
            v = velocity[i * b.latents : (i + 1) * b.latents]
            out.append((v, hidden[i * b.latents : (i + 1) * b.latents]) if w.want_hidden else v)
        return out
