"""Moving a hand-off's contexts to the stage that denoises them.

In one process with one cache the DiT stage takes the very `Context` objects the Thinker built. Across
processes there are two ways, chosen by the sender (`export_handoff(h, share=...)`):

Lent (`share=True`, the process backend): nothing is copied. A context goes as a `LentContext` (its block
table, length and RoPE position) and the hand-off carries the sender's cache tensor; pickled by
`torch.multiprocessing` that is one CUDA IPC handle (or a shared-memory handle on the CPU). A receiver on the
same device reads the rows in place through a read-only `KVCache.borrowed`; one on another device copies
them device to device into its own cache. The sender keeps the lent blocks until the receiver says it is done
with them (`borrows()` tells the receiver whether it must).

Copied (`share=False`, for Ray, whose stages may be on other nodes): a context goes as a `ContextPayload`, its
K and V rows [0, length) of every layer, moved to the CPU with `to_cpu=True`; the receiver writes them into
blocks of its own cache, bit for bit.

A context that appears twice in one hand-off (the same object) is exported once and imported as one context.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from bagel_serve.distributed.parallel_state import tp_all_gather, tp_rank, tp_world_size
from bagel_serve.engine.diffusion import Handoff, HandoffError
from bagel_serve.engine.kv_cache import Context, KVCache

CONTEXT_FIELDS = ("full", "cfg_text", "cfg_img")


@dataclass
class ContextPayload:
    """The rows [0, length) of a context: `kv` is [layers, 2, length, kv heads, head dim]."""

    kv: torch.Tensor
    length: int
    rope: int

    def __repr__(self) -> str:
        return f"ContextPayload(length={self.length}, rope={self.rope}, dtype={self.kv.dtype}, device={self.kv.device})"


@dataclass
class LentContext:
    """A context lent in place: its block table in the sender's cache, its length and RoPE position."""

    blocks: list[int]
    length: int
    rope: int


@dataclass
class HandoffPayload:
    """A `Handoff` as it crosses a process boundary: `fields` holds every field of the hand-off, each
    `Context` replaced by a payload (the same payload object where the hand-off held the same context
    twice). Lent contexts come with the sender's cache tensor and block size."""

    fields: dict[str, Any]
    cache: torch.Tensor | None = None
    block_size: int = 0

    @property
    def lent(self) -> bool:
        return self.cache is not None

    @property
    def request(self) -> Any:
        return self.fields["request"]

    def contexts(self) -> dict[str, ContextPayload | LentContext | None]:
        return {name: self.fields[name] for name in CONTEXT_FIELDS}


@torch.no_grad()
def export_context(ctx: Context, to_cpu: bool = False) -> ContextPayload:
    """Copy a context's rows out of its cache (to the CPU with `to_cpu`; in shared memory on the CPU, so that
    pickling through `torch.multiprocessing` sends a handle)."""
    cache = ctx.cache
    slots = ctx.slots(0, ctx.length).to(cache.device)
    kv = tp_all_gather(cache.tensor.index_select(2, slots), dim=3)  # every KV head, from all TP ranks
    if to_cpu:
        kv = kv.cpu()
    if kv.device.type == "cpu":
        kv.share_memory_()
    return ContextPayload(kv, ctx.length, ctx.rope)


@torch.no_grad()
def import_rows(kv: torch.Tensor, length: int, rope: int, cache: KVCache) -> Context:
    """A new context of `cache` holding `length` rows given as [layers, 2, length, heads, dim] (any device).

    The rows may hold every KV head while this rank holds a tensor-parallel slice of them: it takes its
    slice (a hand-off between stages of different TP sizes is re-sharded by head)."""
    want = (cache.num_layers, 2, length, cache.num_kv_heads, cache.head_dim)
    world = tp_world_size()
    if world > 1 and kv.dim() == 5 and kv.shape[3] == cache.num_kv_heads * world:
        kv = kv.narrow(3, tp_rank() * cache.num_kv_heads, cache.num_kv_heads)
    if tuple(kv.shape) != want:
        raise HandoffError(f"context payload has shape {tuple(kv.shape)}, this model's contexts need {want} "
                           f"(layers, k/v, rows, kv heads, head dim)")
    ctx = Context(cache)
    if length:
        ctx.reserve(length)
        slots = ctx.slots(0, length).to(cache.device)
        with torch.inference_mode(False):
            cache.tensor.index_copy_(2, slots, kv.to(device=cache.device, dtype=cache.dtype))
        ctx.commit(length, 0)
    ctx.rope = rope
    return ctx


def export_handoff(h: Handoff, *, share: bool = False, to_cpu: bool = False) -> HandoffPayload:
    """The hand-off with every context exported (None stays None; a context held twice is sent once).

    `share`: lend the contexts in place (see the module docstring); the caller keeps them (and so their
    blocks) alive until the receiver is done. Otherwise their rows are copied (to the CPU with `to_cpu`)."""
    seen: dict[int, ContextPayload | LentContext] = {}
    fields: dict[str, Any] = {}
    cache = None
    for f in dataclasses.fields(Handoff):
        value = getattr(h, f.name)
        if isinstance(value, Context):
            if id(value) not in seen:
                if share:
                    cache = value.cache
                    seen[id(value)] = LentContext(list(value.block_table), value.length, value.rope)
                else:
                    seen[id(value)] = export_context(value, to_cpu=to_cpu)
            value = seen[id(value)]
        fields[f.name] = value
    if cache is None:
        return HandoffPayload(fields)
    return HandoffPayload(fields, cache=cache.tensor, block_size=cache.block_size)


def borrows(p: HandoffPayload, cache: KVCache) -> bool:
    """Whether importing `p` into `cache`'s stage reads lent rows in place (the sender must then keep them
    until the receiver is done) rather than copying them into `cache`."""
    return p.lent and p.cache.device == cache.device


def blocks_needed(p: HandoffPayload, cache: KVCache) -> int:
    """Blocks of `cache` that importing `p` takes (none when it borrows)."""
    if borrows(p, cache):
        return 0
    bs = cache.block_size
    lengths = {id(c): c.length for c in p.contexts().values() if c is not None}
    return sum(-(-n // bs) + 1 for n in lengths.values())


def import_handoff(p: HandoffPayload, cache: KVCache, lent_cache: KVCache | None = None) -> Handoff:
    """A `Handoff` rebuilt from a payload: its contexts borrow the lent rows in place (same device), or are
    new contexts of `cache` holding copies of them.

    `lent_cache`: the lender's cache as already mapped here (`borrow_cache` of an earlier hand-off). Every
    hand-off maps the same tensor again (on the CPU even at another address), but the contexts one forward
    attends to must all live in one tensor: so the borrower maps the lender's cache once and adopts every
    later hand-off's contexts on it."""
    names = {f.name for f in dataclasses.fields(Handoff)}
    if set(p.fields) != names:
        raise HandoffError(f"hand-off payload fields {sorted(p.fields)} do not match Handoff's {sorted(names)}")
    if p.lent:
        check_lent_cache(p, cache)
        if lent_cache is None:
            lent_cache = borrow_cache(p)
    made: dict[int, Context] = {}
    fields: dict[str, Any] = {}
    for name, value in p.fields.items():
        if isinstance(value, (ContextPayload, LentContext)):
            if id(value) not in made:
                made[id(value)] = _import_one(value, cache, lent_cache)
            value = made[id(value)]
        fields[name] = value
    fields["reserved_blocks"] = 0  # the sender's reservation stays with the sender's cache
    return Handoff(**fields)


def borrow_cache(p: HandoffPayload) -> KVCache:
    """The lender's cache of a lent payload, mapped here read-only."""
    return KVCache.borrowed(p.cache, p.block_size)


def check_lent_cache(p: HandoffPayload, cache: KVCache) -> None:
    """A lent cache must hold contexts of this model."""
    t = p.cache
    if t.dim() != 5 or (t.shape[0], t.shape[3], t.shape[4]) != (cache.num_layers, cache.num_kv_heads, cache.head_dim):
        raise HandoffError(f"the lent KV cache {tuple(t.shape)} does not fit this model's contexts "
                           f"({cache.num_layers} layers, {cache.num_kv_heads} kv heads, head dim {cache.head_dim})")
    return KVCache.borrowed(t, p.block_size)


def _import_one(value: ContextPayload | LentContext, cache: KVCache, lent_cache: KVCache | None) -> Context:
    if isinstance(value, ContextPayload):
        return import_rows(value.kv, value.length, value.rope, cache)
    lent = Context.adopt(lent_cache, value.blocks, value.length, value.rope)
    if lent_cache.device == cache.device:
        return lent
    try:  # device to device
        slots = lent.slots(0, lent.length).to(lent_cache.device)
        return import_rows(lent_cache.tensor.index_select(2, slots), lent.length, lent.rope, cache)
    finally:
        lent.release()
