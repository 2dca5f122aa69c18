"""Moving contexts and hand-offs between processes.

In one process the two-stage topology hands stage 1 the very `Context` objects stage 0 built. Across
processes there are two ways, chosen by the sender (`export_handoff(h, share=...)`):

Lent (`share=True`, the process backend): nothing is copied. A context goes as a `LentContext` (its
block table, length and RoPE position) and the hand-off carries the sender's pool slabs
(`KVPool.slabs()`); pickled by `torch.multiprocessing` those are shared-memory handles on the CPU (the
sender's pool is made with `shared=True`) and CUDA IPC handles on a GPU. A receiver on the same device
reads the rows in place, through a read-only `KVPool.borrowed` pool; one on another device copies them
device to device into its own pool. The sender keeps the lent blocks until the receiver says it is done
with them (`borrows()` tells the receiver whether it must).

Copied (`share=False`, for Ray, whose stages may be on other nodes): a context goes as a
`ContextPayload`, its K and V rows [0, length) of every layer (one tensor each, shaped [layers, length,
kv_heads, head_dim]), moved to the CPU with `to_cpu=True`; the receiver appends them to a fresh context
of its own pool through the public `Context` API (reserve, `attend_keys(..., commit=True)` per layer,
`commit`), so the rows land in its KV cache bit for bit.

`HandoffPayload` is a `Handoff` whose contexts are payloads (None stays None). A context that appears
twice in one hand-off (the same object) is exported once and imported as one context again.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from bagel_serve.engine.kv_cache import Context, KVPool
from bagel_serve.engine.runner import Handoff, HandoffError, Runner


@dataclass
class ContextPayload:
    """The rows [0, length) of a context, per layer, with its RoPE position.

    `k` and `v` are [num_layers, length, num_kv_heads, head_dim] (layer i's rows are `k[i]`, `v[i]`).
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int
    rope: int

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    def keys(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def __repr__(self) -> str:
        return (f"ContextPayload(length={self.length}, rope={self.rope}, layers={self.num_layers}, "
                f"dtype={self.k.dtype}, device={self.k.device})")


@dataclass
class LentContext:
    """A context lent in place: its block table in the sender's pool, its length and RoPE position."""

    blocks: list[int]
    length: int
    rope: int


@dataclass
class HandoffPayload:
    """A `Handoff` as it crosses a process boundary: `fields` holds every field of the hand-off, with
    each `Context` replaced by a `ContextPayload` or a `LentContext` (the same payload object where the
    hand-off held the same context object twice). Lent contexts come with the sender's pool slabs
    (`slabs`, as `KVPool.slabs()` lists them) and its `block_size`."""

    fields: dict[str, Any]
    slabs: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None
    block_size: int = 0

    @property
    def lent(self) -> bool:
        return self.slabs is not None

    @property
    def request_index(self) -> int:
        return self.fields["output"].request_index

    def contexts(self) -> dict[str, ContextPayload | None]:
        """The context fields (full, cfg_text, cfg_img): a payload each, or None."""
        return {name: self.fields[name] for name in _context_fields()}


# ---------------------------------------------------------------------------------------------- contexts
def _geometry(ctx: Context) -> tuple[int, torch.dtype, torch.device] | None:
    """(kv_heads, head_dim) shape tail, dtype and device of a context's rows, from its pool when it has one."""
    pool = getattr(ctx, "pool", None)
    if pool is not None and hasattr(pool, "num_kv_heads"):
        return (pool.num_kv_heads, pool.head_dim), pool.dtype, pool.device
    return None


@torch.no_grad()
def export_context(ctx: Context, to_cpu: bool = False) -> ContextPayload:
    """Copy a context's rows [0, length) out of its KV cache into a payload that can cross processes.

    On the CPU the payload's tensors are created in shared memory (pickling them through
    `torch.multiprocessing` sends a handle, not the data); on CUDA they stay on the context's device
    (CUDA IPC handles) unless `to_cpu` (for transports that pickle by value, such as Ray's).
    """
    n = ctx.length
    layers = ctx.num_layers
    geo = _geometry(ctx)
    if n == 0:
        if geo is None:
            tail, dtype, device = (0, 0), torch.float32, torch.device("cpu")
        else:
            tail, dtype, device = geo
        k = torch.empty((layers, 0, *tail), dtype=dtype, device=device)
        return ContextPayload(k, k.clone(), 0, ctx.rope)
    k0, _ = ctx.keys(0)
    shape = (layers, n, *k0.shape[1:])
    device = torch.device("cpu") if to_cpu else k0.device
    k = torch.empty(shape, dtype=k0.dtype, device=device)
    v = torch.empty(shape, dtype=k0.dtype, device=device)
    if k.device.type == "cpu":
        k.share_memory_()
        v.share_memory_()
    for layer in range(layers):
        kl, vl = ctx.keys(layer)
        k[layer].copy_(kl[:n])
        v[layer].copy_(vl[:n])
    return ContextPayload(k, v, n, ctx.rope)


def _reserve(ctx: Context, n: int, like: torch.Tensor) -> None:
    """`ctx.reserve(n)`, or `ctx.reserve(n, like)` for a Context API that needs an example row tensor."""
    params = inspect.signature(ctx.reserve).parameters
    if len(params) >= 2:
        ctx.reserve(n, like)
    else:
        ctx.reserve(n)


@torch.no_grad()
def import_context(payload: ContextPayload, runner: Runner) -> Context:
    """A new context of `runner` holding the payload's rows, length and RoPE position."""
    llm = runner.cfg.llm
    want = (llm.num_hidden_layers, payload.length, llm.num_key_value_heads, llm.head_dim)
    for name, t in (("k", payload.k), ("v", payload.v)):
        if tuple(t.shape) != want:
            raise HandoffError(f"context payload {name} has shape {tuple(t.shape)}, this model's contexts need {want} "
                               f"(layers, rows, kv heads, head dim)")
    return _copy_rows(runner, payload.keys, payload.length, payload.rope)


def _copy_rows(runner: Runner, keys: Callable[[int], tuple[torch.Tensor, torch.Tensor]], n: int, rope: int) -> Context:
    """A new context of `runner` with n rows per layer taken from `keys(layer)` (any device)."""
    llm = runner.cfg.llm
    ctx = runner._empty()
    if n:
        dtype, device = runner.model.dtype, runner.model.device
        _reserve(ctx, n, torch.empty((0, llm.num_key_value_heads, llm.head_dim), dtype=dtype, device=device))
        for layer in range(llm.num_hidden_layers):
            k, v = keys(layer)
            ctx.attend_keys(layer, k[:n].to(device=device, dtype=dtype), v[:n].to(device=device, dtype=dtype),
                            commit=True)
        ctx.commit(0)
    ctx.rope = rope
    return ctx


# ---------------------------------------------------------------------------------------------- hand-offs
def _context_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Handoff) if "Context" in str(f.type))


def export_handoff(h: Handoff, *, share: bool = False, to_cpu: bool = False) -> HandoffPayload:
    """The hand-off with every context exported (None stays None; a context held twice is sent once).

    `share`: lend the contexts in place (see the module docstring); the caller keeps them (and so their
    blocks) alive until the receiver is done. Otherwise their rows are copied (to the CPU with `to_cpu`).
    """
    seen: dict[int, ContextPayload | LentContext] = {}
    fields: dict[str, Any] = {}
    pool = None
    for f in dataclasses.fields(Handoff):
        value = getattr(h, f.name)
        if isinstance(value, Context):
            if id(value) not in seen:
                if share:
                    pool = value.pool
                    seen[id(value)] = LentContext(list(value.block_table), value.length, value.rope)
                else:
                    seen[id(value)] = export_context(value, to_cpu=to_cpu)
            value = seen[id(value)]
        fields[f.name] = value
    if pool is None:
        return HandoffPayload(fields)
    return HandoffPayload(fields, slabs=pool.slabs(), block_size=pool.block_size)


def borrows(p: HandoffPayload, runner: Runner) -> bool:
    """Whether importing `p` into `runner` reads lent rows in place (so the sender must keep them until
    the receiver is done) rather than copying them into the runner's own pool."""
    return p.lent and bool(p.slabs) and p.slabs[0][1].device == runner.model.device


def blocks_needed(p: HandoffPayload, runner: Runner) -> int:
    """Blocks of the runner's own pool that importing `p` takes (none when it borrows)."""
    if borrows(p, runner):
        return 0
    bs = runner.pool.block_size
    lengths = {id(c): c.length for c in p.contexts().values() if c is not None}
    return sum(-(-n // bs) + 1 for n in lengths.values())


def import_handoff(p: HandoffPayload, runner: Runner) -> Handoff:
    """A `Handoff` of `runner` rebuilt from a payload: its contexts borrow the lent rows in place (same
    device), or are new contexts of the runner's KV cache holding copies of them."""
    names = {f.name for f in dataclasses.fields(Handoff)}
    if set(p.fields) != names:
        raise HandoffError(f"hand-off payload fields {sorted(p.fields)} do not match Handoff's {sorted(names)}")
    lent_pool = _borrowed_pool(p, runner) if p.lent else None
    made: dict[int, Context] = {}
    fields: dict[str, Any] = {}
    for name, value in p.fields.items():
        if isinstance(value, (ContextPayload, LentContext)):
            if id(value) not in made:
                made[id(value)] = _import_one(value, runner, lent_pool)
            value = made[id(value)]
        fields[name] = value
    fields["reserved_blocks"] = 0  # the sender's reservation stays with the sender's pool
    return Handoff(**fields)


def _borrowed_pool(p: HandoffPayload, runner: Runner) -> KVPool:
    llm = runner.cfg.llm
    k = p.slabs[0][1] if p.slabs else None
    if k is None or k.dim() != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (
            llm.num_hidden_layers, llm.num_key_value_heads, llm.head_dim):
        raise HandoffError(f"lent KV slabs {None if k is None else tuple(k.shape)} do not fit this model's contexts "
                           f"({llm.num_hidden_layers} layers, {llm.num_key_value_heads} kv heads, head dim {llm.head_dim})")
    return KVPool.borrowed(p.slabs, p.block_size)


def _import_one(value: ContextPayload | LentContext, runner: Runner, lent_pool: KVPool | None) -> Context:
    if isinstance(value, ContextPayload):
        return import_context(value, runner)
    lent = Context.adopt(lent_pool, value.blocks, value.length, value.rope)
    if lent_pool.device == runner.model.device:
        return lent
    try:
        return _copy_rows(runner, lent.keys, lent.length, lent.rope)  # device to device
    finally:
        lent.release()


def release_handoff_contexts(h: Handoff) -> None:
    """Give a hand-off's contexts back to their KV cache now (after they were exported or used)."""
    for f in dataclasses.fields(Handoff):
        value = getattr(h, f.name)
        if isinstance(value, Context) and hasattr(value, "release"):
            value.release()
