"""The model runner: works in, results out — lay the rows out, run the model, read the heads, sample.

A forward is a flat batch of rows from many sequences. `_layout` places them once: the one-token decode
steps first, then the other understanding rows (text, ViT blocks, image-boundary tokens), then the
generation rows (VAE latents), and describes them in a `ForwardContext` (expert split, RoPE positions,
cache slots of committed rows, block tables and context lengths of the decode steps, keys of every other
sequence). The layers read that; nothing in the model calls back here.

Decode forwards — every work a one-token step, as in steady text generation — replay a CUDA graph captured
per batch-size bucket on static input buffers (all graphs share one memory pool); the LM head runs inside
it, sampling right after on the device, and the chosen tokens come to the host in one transfer. Denoising
forwards of small images replay graphs of their own (`engine.denoise_graphs`). Anything else runs eagerly
through the same modules. `enforce_eager` turns graphs off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from bagel_serve.distributed import parallel_state as ps
from bagel_serve.engine.denoise_graphs import DenoiseGraphs, graph_sizes
from bagel_serve.engine.kv_cache import KVCache, slot_of
from bagel_serve.engine.sampling import sample
from bagel_serve.engine.sequence import DECODE_STEPS, Work
from bagel_serve.engine.tokenizer import SpecialTokens
from bagel_serve.layers.attention_backends import (AttentionBackend, DecodeBatch, PackedAttention, SequenceAttention,
                                                   pack_sequences, select_backend)
from bagel_serve.layers.forward_context import ForwardContext, forward_context
from bagel_serve.layers.kernels import use_triton
from bagel_serve.model.bagel import Bagel
from bagel_serve.model.layout import LatentPiece, TextPiece, VitPiece, gen_rows, is_causal, piece_positions, rope_advance, und_rows

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
"""Decode batch-size buckets captured as CUDA graphs (a batch runs in the smallest bucket that holds it)."""


def reserve_blocks(works: list[Work]) -> None:
    """Give every committed work's context the blocks its rows go into (before the forward: this is where a
    full cache shows, while nothing has been written yet)."""
    for w in works:
        if w.commit:
            w.context.reserve(w.rows)


@dataclass
class _Layout:
    """One forward's rows and metadata, on the host."""

    n_und: int = 0
    n_decode: int = 0
    und_ids: list[int] = field(default_factory=list)
    decode_positions: list[int] = field(default_factory=list)
    decode_slots: list[int] = field(default_factory=list)
    vit_rows: list[int] = field(default_factory=list)
    vits: list[VitPiece] = field(default_factory=list)
    latents: list[LatentPiece] = field(default_factory=list)
    positions: list[torch.Tensor] = field(default_factory=list)
    slots: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (first row, slots of its rows)
    decode_tables: list[tuple[int, ...]] = field(default_factory=list)
    decode_lens: list[int] = field(default_factory=list)
    sequences: list[tuple[list[tuple[int, int]], bool, torch.Tensor | None, list[tuple[int, int]]]] = field(default_factory=list)
    logit_rows: list[int] = field(default_factory=list)
    outputs: list[tuple[int, str, Any]] = field(default_factory=list)  # (work index, kind, row or (start, n))

    @property
    def pure_decode(self) -> bool:
        """Every work a one-token decode step: no other sequence is in the forward."""
        return not self.sequences


class ModelRunner:
    """Runs forwards of one model over one KV cache."""

    def __init__(self, model: Bagel, cache: KVCache, special: SpecialTokens, *, max_num_seqs: int = 256,
                 max_model_len: int = 32768, enforce_eager: bool = False, attention_backend: str | None = None,
                 denoise_graph_sizes: tuple[tuple[int, int], ...] | None = ()) -> None:
        self.model = model
        self.cache = cache
        self.special = special
        self.device = model.device
        self.backend: AttentionBackend = select_backend(self.device, attention_backend)
        self.graphs: DecodeGraphs | None = None
        layout = ps.layout()
        self.shards_layers = layout is not None and layout.use_hsdp
        """The decoder layers are sharded over the stage's ranks (HSDP), so every rank runs every forward."""
        self.warmup_s = 0.0
        """Seconds `warm_up` took (the attention kernels' one-time set-up)."""
        self.graphed = False
        """Whether the last forward replayed a CUDA graph."""
        self.denoise_graphs: DenoiseGraphs | None = None
        # Graphs need the fused kernels: their plain-torch twins synchronise with the host. Both kinds share one
        # memory pool; the denoising ones (for `denoise_graph_sizes`) run on one rank only.
        can_graph = self.device.type == "cuda" and use_triton(cache.tensor)
        self.graph_pool = torch.cuda.graph_pool_handle() if can_graph else None
        if can_graph and not enforce_eager:
            max_blocks = -(-max_model_len // cache.block_size) + 1
            self.graphs = DecodeGraphs(self, min(max_num_seqs, GRAPH_BATCH_SIZES[-1]), max_blocks)
        sizes = graph_sizes(denoise_graph_sizes, model.config)
        if can_graph and sizes and layout is None and self.backend.packs([1], model.dtype):
            self.denoise_graphs = DenoiseGraphs(model, cache, self.backend, special, self.graph_pool, sizes)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run the attention backend's one-time set-up now (once per process, at start)."""
        llm = self.model.config.llm
        t0 = time.perf_counter()
        attn = self.model.language_model.model.layers[0].self_attn  # this rank's heads, under TP
        self.backend.warm_up(self.device, self.model.dtype, attn.num_heads, attn.num_kv_heads,
                             llm.head_dim, fp8=attn.attn.fp8)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmup_s = time.perf_counter() - t0

    # ------------------------------------------------------------------ forwards
    @torch.inference_mode()
    def execute(self, works: list[Work]) -> list[Any]:
        """Run one forward over the works (see `_forward`). Under CFG parallelism this rank runs only the
        denoising works of its CFG branches (and every work of no branch); the branch works' results are
        then summed over the CFG ranks, each computed on exactly one and zero on the others: every rank
        returns every result, the same on all of them (and what one rank computing them all returns, up to
        the rounding of a forward packing fewer branches)."""
        size = ps.cfg_world_size()
        if size == 1 or all(w.cfg_branch is None for w in works):
            return self._forward(works)
        rank = ps.cfg_rank()
        mine = [i for i, w in enumerate(works) if w.cfg_branch is None or w.cfg_branch % size == rank]
        # With HSDP every rank must run every forward (they gather each layer's weights together): an idle
        # rank computes a branch it does not own, and drops the result.
        run = mine if mine or not self.shards_layers else [0]
        local = self._forward([works[i] for i in run]) if run else []
        results: list[Any] = [None] * len(works)
        for i, r in zip(run, local):
            if i in mine:
                results[i] = r
        branch = [i for i, w in enumerate(works) if w.cfg_branch is not None]
        sizes = [works[i].piece.latents.shape[0] for i in branch]
        bounds = [sum(sizes[:j]) for j in range(len(sizes) + 1)]
        velocity = torch.zeros(bounds[-1], self.model.config.patch_latent_dim, device=self.device)
        hidden = None
        if any(works[i].want_hidden for i in branch):
            hidden = torch.zeros(bounds[-1], self.model.config.llm.hidden_size, dtype=self.model.dtype,
                                 device=self.device)
        for j, i in enumerate(branch):
            if results[i] is not None:
                v, h = results[i] if works[i].want_hidden else (results[i], None)
                velocity[bounds[j] : bounds[j + 1]] = v
                if h is not None:
                    hidden[bounds[j] : bounds[j + 1]] = h
        ps.cfg_all_reduce(velocity)
        if hidden is not None:
            ps.cfg_all_reduce(hidden)
        for j, i in enumerate(branch):
            v = velocity[bounds[j] : bounds[j + 1]]
            results[i] = (v, hidden[bounds[j] : bounds[j + 1]]) if works[i].want_hidden else v
        return results

    def _forward(self, works: list[Work]) -> list[Any]:
        """Run one forward over the works (their blocks reserved: `reserve_blocks`); one result per work:
        the tokens sampled for works with a sampler (a list: one, or a burst of DECODE_STEPS when a greedy
        decode batch runs that many steps in one graph replay), the last row's logits for other text works
        that want output, the velocity of the latents for latent works that want output (with `want_hidden`:
        the velocity and the latents' hidden rows before the final norm), else None."""
        cache = works[0].context.cache
        if any(w.context.cache is not cache for w in works):
            raise RuntimeError("the contexts of one forward must live in one KV cache")
        lay = self._layout(works)
        self.graphed = False
        if self.denoise_graphs is not None and not lay.n_decode:
            bucket = self.denoise_graphs.bucket(works)
            if bucket is not None:
                self.graphed = True
                return self.denoise_graphs.run(works, lay.und_ids, torch.cat(lay.positions), bucket)
        logits = velocity = gen_hidden = bursts = None
        if self.graphs is not None and cache is self.cache and lay.pure_decode and lay.n_decode <= self.graphs.max_batch:
            self.graphed = True
            if self._bursts(works, lay):
                bursts = self.graphs.run_steps(lay, DECODE_STEPS)
            else:
                logits = self.graphs.run(lay)
                if lay.logit_rows != list(range(lay.n_decode)):
                    logits = logits[lay.logit_rows]
        else:
            with forward_context(self._context(lay, cache)):
                hidden = self.model.transformer(self._embed(lay))
                if lay.logit_rows:
                    logits = self.model.lm_logits(hidden.index_select(0, self._up(torch.tensor(lay.logit_rows))))
                gen = [where for _, kind, where in lay.outputs if kind == "velocity"]
                if gen:
                    rows = self._up(torch.cat([torch.arange(a, a + n) for a, n in gen]))
                    gen_hidden = hidden.index_select(0, rows)
                    velocity = self.model.velocity(gen_hidden).float()
        steps = DECODE_STEPS if bursts is not None else 1
        for w in works:
            if w.is_decode:
                w.context.commit(steps, steps)
            elif w.commit:
                w.context.commit(w.rows, rope_advance(w.piece))
        if bursts is not None:
            return [bursts[j] for j in range(len(works))]  # pure decode: rows are the works, in order
        return self._results(works, lay, logits, velocity, gen_hidden)

    @staticmethod
    def _bursts(works: list[Work], lay: _Layout) -> bool:
        """Whether a decode batch can run DECODE_STEPS steps on the device: every work's sampler able to
        burst (`Sampler.can_burst`), wanting its tokens, with that many rows reserved."""
        return all(w.want_output and w.steps >= DECODE_STEPS and w.sampler is not None and w.sampler.can_burst
                   for w in works)

    def _results(self, works: list[Work], lay: _Layout, logits: torch.Tensor | None,
                 velocity: torch.Tensor | None, gen_hidden: torch.Tensor | None) -> list[Any]:
        results: list[Any] = [None] * len(works)
        text = [i for i, kind, _ in lay.outputs if kind == "logits"]  # in the order of the logits rows
        rows = [j for j, i in enumerate(text) if works[i].sampler is not None]
        if rows:
            tokens = self.sample(logits[rows], [works[text[j]].sampler for j in rows])
            for j, tok in zip(rows, tokens):
                results[text[j]] = [tok]
        for j, i in enumerate(text):
            if results[i] is None:
                results[i] = logits[j].to(torch.float32, copy=True)  # never a view of a graph's buffer
        v = 0
        for i, kind, where in lay.outputs:
            if kind == "velocity":
                results[i] = velocity[v : v + where[1]]
                if works[i].want_hidden:
                    results[i] = (results[i], gen_hidden[v : v + where[1]])
                v += where[1]
        return results

    def sample(self, logits: torch.Tensor, samplers: list) -> list[int]:
        """The next token of each row (the one device-to-host transfer of a decode step)."""
        return sample(logits, samplers)

    # ------------------------------------------------------------------ layout
    def _layout(self, works: list[Work]) -> _Layout:
        lay = _Layout()
        decode = [i for i, w in enumerate(works) if w.is_decode]
        rest = [i for i, w in enumerate(works) if not w.is_decode]
        lay.n_decode = len(decode)
        lay.n_und = len(decode) + sum(und_rows(works[i].piece) for i in rest)
        bs = works[0].context.cache.block_size
        # Decode steps: plain integers (this runs for every token of every sequence).
        for u, i in enumerate(decode):
            w = works[i]
            ctx, n = w.context, w.context.length
            table = ctx.block_table
            lay.und_ids.append(int(w.piece.ids[0]))
            lay.decode_positions.append(ctx.rope)
            lay.decode_slots.append(slot_of(table, n, bs))
            lay.decode_tables.append(table)
            lay.decode_lens.append(n + 1)
            if w.want_output:
                lay.outputs.append((i, "logits", u))
        vs, ve = self.special.start_of_image, self.special.end_of_image
        u, g, gen_pos = lay.n_decode, lay.n_und, []
        for i in rest:
            w = works[i]
            ctx, piece = w.context, w.piece
            nu, ng = und_rows(piece), gen_rows(piece)
            pu, pg = piece_positions(piece, ctx.rope)
            lay.positions.append(pu)
            gen_pos.append(pg)
            # The cache slots the sequence attends to: its cached rows', then (when stored) its new rows', which
            # are also where the forward writes them.
            kv = ctx.slots(0, ctx.length + (nu + ng if w.commit else 0)) if ctx.length or w.commit else None
            if w.commit:
                new = kv[ctx.length :]
                lay.slots.append((u, new[:nu]))
                if ng:
                    lay.slots.append((g, new[nu:]))
            if isinstance(piece, TextPiece):
                lay.und_ids += piece.ids.tolist()
                segments = [(u, nu)]
            elif isinstance(piece, VitPiece):
                lay.und_ids += [vs, *([0] * (nu - 2)), ve]
                lay.vit_rows += range(u + 1, u + nu - 1)
                lay.vits.append(piece)
                segments = [(u, nu)]
            else:
                lay.und_ids += [vs, ve]
                lay.latents.append(piece)
                segments = [(u, nu), (g, ng)]
            lay.sequences.append((segments, is_causal(piece), kv, [] if w.commit else segments))
            if w.want_output:
                if isinstance(piece, LatentPiece):
                    lay.outputs.append((i, "velocity", (g, ng)))
                else:
                    lay.outputs.append((i, "logits", u + nu - 1))
            u += nu
            g += ng
        lay.positions += gen_pos
        # Results are read in work order; the logits rows in that order too.
        lay.outputs.sort(key=lambda o: o[0])
        lay.logit_rows = [where for _, kind, where in lay.outputs if kind == "logits"]
        return lay

    def _up(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the model's device without waiting for the device: copies from pageable memory
        wait for the work queued before them, which would stop the host preparing the next forward while the
        device runs this one."""
        if self.device.type != "cuda" or t.device.type != "cpu":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _context(self, lay: _Layout, cache: KVCache) -> ForwardContext:
        n = lay.n_und + sum(p.latents.shape[0] for p in lay.latents)
        positions = self._up(torch.cat([torch.tensor(lay.decode_positions, dtype=torch.int64), *lay.positions]))
        slot_mapping = None
        if lay.slots or lay.decode_slots:
            sm = torch.full((n,), -1, dtype=torch.int64)
            sm[: lay.n_decode] = torch.tensor(lay.decode_slots, dtype=torch.int64)
            for a, s in lay.slots:
                sm[a : a + s.shape[0]] = s
            slot_mapping = self._up(sm)
        decode = None
        if lay.n_decode:
            width = max(len(t) for t in lay.decode_tables)
            tables = torch.zeros((lay.n_decode, width), dtype=torch.int32)
            for i, t in enumerate(lay.decode_tables):
                tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
            decode = DecodeBatch(lay.n_decode, self._up(tables), self._up(torch.tensor(lay.decode_lens, dtype=torch.int32)),
                                 cache.block_size)
        packed = self._packed(lay)
        if packed is not None:
            return ForwardContext(lay.n_und, positions, slot_mapping, cache.tensor, self.backend, decode, [], packed)
        sequences = []
        kv = [s[2] for s in lay.sequences if s[2] is not None]
        kv_dev = iter(self._up(torch.cat(kv)).split([t.shape[0] for t in kv])) if kv else iter(())
        for segments, causal, slots, new in lay.sequences:
            sequences.append(SequenceAttention(segments, causal, next(kv_dev) if slots is not None else None, new))
        return ForwardContext(lay.n_und, positions, slot_mapping, cache.tensor, self.backend, decode, sequences)

    def _packed(self, lay: _Layout) -> PackedAttention | None:
        """One varlen attention for every sequence, when each is an unstored, unmasked block (denoising steps)
        of a size the backend packs (`AttentionBackend.packs`)."""
        seqs = lay.sequences
        if not seqs or any(causal or new != segments for segments, causal, _, new in seqs):
            return None
        q_rows = [torch.cat([torch.arange(a, a + n) for a, n in segments]) for segments, _, _, _ in seqs]
        if not self.backend.packs([r.numel() for r in q_rows], self.model.dtype):
            return None
        f = pack_sequences(q_rows, [slots for _, _, slots, _ in seqs])
        return PackedAttention(**{k: self._up(v) if isinstance(v, torch.Tensor) else v for k, v in f.items()})

    def _embed(self, lay: _Layout) -> torch.Tensor:
        model, up = self.model, self._up
        x = model.embed_text(up(torch.tensor(lay.und_ids)))
        if lay.vits:
            vit = model.embed_vit(up(torch.cat([p.patches for p in lay.vits])),
                                  up(torch.cat([p.position_ids for p in lay.vits])),
                                  [p.patches.shape[0] for p in lay.vits])
            x.index_copy_(0, up(torch.tensor(lay.vit_rows)), vit.to(x.dtype))
        if lay.latents:
            lat = lay.latents
            counts = [p.latents.shape[0] for p in lat]
            gen = model.embed_latents(torch.cat([up(p.latents) for p in lat]),
                                      up(torch.tensor([p.t for p in lat], dtype=torch.float32)), counts,
                                      up(torch.cat([p.position_ids for p in lat])),
                                      up(torch.tensor(counts)))
            x = torch.cat([x, gen.to(x.dtype)])
        return x


class DecodeGraphs:
    """CUDA graphs of the decode forward (embedding, every layer, final norm, LM head), per batch-size bucket,
    over static input buffers; padded rows write nowhere (slot -1) and attend to nothing. Two per bucket: one
    step that leaves the logits for sampling, and DECODE_STEPS greedy steps that feed each step's argmax to
    the next on the device, for the host to read once. Inputs go up from pinned staging buffers in three
    asynchronous copies, which the next load waits for before it rewrites those buffers."""

    def __init__(self, runner: ModelRunner, max_batch: int, max_blocks: int) -> None:
        self.runner = runner
        self.sizes = [b for b in GRAPH_BATCH_SIZES if b <= max_batch] or [1]
        self.max_batch = self.sizes[-1]
        dev = runner.device
        n, k = self.max_batch, DECODE_STEPS
        self.rows = torch.zeros((3, k, n), dtype=torch.int64, device=dev)  # token ids, positions, slots per step
        self.lens = torch.zeros((k, n), dtype=torch.int32, device=dev)
        self.tables = torch.zeros((n, max_blocks), dtype=torch.int32, device=dev)
        self.tokens = torch.zeros((k, n), dtype=torch.int64, device=dev)
        self._rows = torch.zeros((3, k, n), dtype=torch.int64).pin_memory()
        self._lens = torch.zeros((k, n), dtype=torch.int32).pin_memory()
        self._tables = torch.zeros(n * max_blocks, dtype=torch.int32).pin_memory()
        self._staged = torch.cuda.Event()
        """Recorded after the copies out of the staging buffers: they are not rewritten before it passed."""
        vocab = runner.model.config.llm.vocab_size
        self.logits = torch.empty((n, vocab), dtype=runner.model.dtype, device=dev)  # every graph writes here
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (batch bucket, steps)
        self.capture_s = 0.0
        self.memory_bytes = 0

    def _step(self, bs: int, i: int, greedy: bool) -> None:
        """Step i of a replay: its own positions, slots and lengths; its input the last step's argmax."""
        r = self.runner
        ids = self.rows[0, 0, :bs] if i == 0 else self.tokens[i - 1, :bs]
        ctx = ForwardContext(bs, self.rows[1, i, :bs], self.rows[2, i, :bs], r.cache.tensor, r.backend,
                             DecodeBatch(bs, self.tables[:bs], self.lens[i, :bs], r.cache.block_size))
        with forward_context(ctx):
            m = r.model
            m.lm_logits(m.transformer(m.embed_text(ids)), out=self.logits[:bs])
        if greedy:
            torch.argmax(self.logits[:bs], dim=-1, out=self.tokens[i, :bs])

    def _replay_body(self, bs: int, steps: int) -> None:
        for i in range(steps):
            self._step(bs, i, greedy=steps > 1)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (so smaller ones reuse its memory in the shared pool)."""
        self.rows[2].fill_(-1)
        torch.cuda.synchronize()
        t0, free0 = time.perf_counter(), torch.cuda.mem_get_info()[0]
        for bs in reversed(self.sizes):
            for steps in (1, DECODE_STEPS):
                self._replay_body(bs, steps)  # warm up: compiles the kernels, settles the allocator
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.runner.graph_pool):
                    self._replay_body(bs, steps)
                self.graphs[bs, steps] = g
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0
        self.memory_bytes = max(0, free0 - torch.cuda.mem_get_info()[0])

    def _load(self, lay: _Layout, steps: int) -> int:
        """Stage the batch's inputs for `steps` steps and copy them up; returns the bucket."""
        self._staged.synchronize()  # the last load's copies may still be reading the staging buffers
        n = lay.n_decode
        bs = next(b for b in self.sizes if b >= n)
        block = self.runner.cache.block_size
        rows, lens = self._rows.numpy(), self._lens.numpy()
        rows[0, 0, :n] = lay.und_ids
        for i in range(steps):
            rows[1, i, :n] = [p + i for p in lay.decode_positions]
            rows[2, i, :n] = [slot_of(t, ln - 1 + i, block) for t, ln in zip(lay.decode_tables, lay.decode_lens)]
            lens[i, :n] = [ln + i for ln in lay.decode_lens]
            rows[2, i, n:bs] = -1  # padding: stores nothing
            lens[i, n:bs] = 0  # and attends to nothing
        width = max(len(t) for t in lay.decode_tables)
        tables = self._tables[: n * width].view(n, width)
        tab = tables.numpy()
        for i, t in enumerate(lay.decode_tables):
            tab[i, : len(t)] = t
        self.rows[:, :steps, :bs].copy_(self._rows[:, :steps, :bs], non_blocking=True)
        self.lens[:steps, :bs].copy_(self._lens[:steps, :bs], non_blocking=True)
        self.tables[:n, :width].copy_(tables, non_blocking=True)
        self._staged.record(torch.cuda.current_stream(self.runner.device))
        return bs

    def run(self, lay: _Layout) -> torch.Tensor:
        """One step; the logits of the batch's rows."""
        self.graphs[self._load(lay, 1), 1].replay()
        return self.logits[: lay.n_decode]

    def run_steps(self, lay: _Layout, steps: int) -> list[list[int]]:
        """`steps` greedy steps; each row's tokens, in order (the one device-to-host transfer)."""
        self.graphs[self._load(lay, steps), steps].replay()
        return self.tokens[:steps, : lay.n_decode].t().tolist()
