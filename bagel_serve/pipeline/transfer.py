"""Moving contexts and hand-offs between processes.

In one process the two-stage topology hands stage 1 the very `Context` objects stage 0 built. Across
processes a context is sent as a `ContextPayload`: its K and V rows [0, length) of every layer (one
tensor each for K and V, shaped [layers, length, kv_heads, head_dim]), its length and its RoPE
position. A payload is plain data that pickles through `torch.multiprocessing` queues: on the CPU
its tensors are allocated in shared memory, so only a handle crosses the pipe; on CUDA they go as CUDA
IPC handles. The receiver appends the rows to a fresh context of its own runner through the public
`Context` API (reserve, `attend_keys(..., commit=True)` per layer, `commit`), so the rows land in its
own KV cache bit for bit.

`HandoffPayload` is a `Handoff` whose contexts are payloads (None stays None). A context that appears
twice in one hand-off (the same object) is exported once and imported as one context again.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from bagel_serve.engine.kv_cache import Context
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
class HandoffPayload:
    """A `Handoff` as it crosses a process boundary: `fields` holds every field of the hand-off, with
    each `Context` replaced by a `ContextPayload` (the same payload object where the hand-off held the
    same context object twice)."""

    fields: dict[str, Any]

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
def export_context(ctx: Context) -> ContextPayload:
    """Copy a context's rows [0, length) out of its KV cache into a payload that can cross processes.

    On the CPU the payload's tensors are created in shared memory (pickling them sends a handle, not
    the data); on CUDA they stay on the context's device (sent as CUDA IPC handles).
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
    k = torch.empty(shape, dtype=k0.dtype, device=k0.device)
    v = torch.empty(shape, dtype=k0.dtype, device=k0.device)
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
    ctx = runner._empty()
    n = payload.length
    if n:
        dtype, device = runner.model.dtype, runner.model.device
        _reserve(ctx, n, torch.empty((0, llm.num_key_value_heads, llm.head_dim), dtype=dtype, device=device))
        for layer in range(llm.num_hidden_layers):
            k = payload.k[layer].to(device=device, dtype=dtype)
            v = payload.v[layer].to(device=device, dtype=dtype)
            ctx.attend_keys(layer, k, v, commit=True)
        ctx.commit(0)
    ctx.rope = payload.rope
    return ctx


# ---------------------------------------------------------------------------------------------- hand-offs
def _context_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Handoff) if "Context" in str(f.type))


def export_handoff(h: Handoff) -> HandoffPayload:
    """The hand-off with every context exported (None stays None; a context held twice is sent once)."""
    seen: dict[int, ContextPayload] = {}
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(Handoff):
        value = getattr(h, f.name)
        if isinstance(value, Context):
            if id(value) not in seen:
                seen[id(value)] = export_context(value)
            value = seen[id(value)]
        fields[f.name] = value
    return HandoffPayload(fields)


def import_handoff(p: HandoffPayload, runner: Runner) -> Handoff:
    """A `Handoff` of `runner` rebuilt from a payload; the contexts are new contexts of its KV cache."""
    names = {f.name for f in dataclasses.fields(Handoff)}
    if set(p.fields) != names:
        raise HandoffError(f"hand-off payload fields {sorted(p.fields)} do not match Handoff's {sorted(names)}")
    made: dict[int, Context] = {}
    fields: dict[str, Any] = {}
    for name, value in p.fields.items():
        if isinstance(value, ContextPayload):
            if id(value) not in made:
                made[id(value)] = import_context(value, runner)
            value = made[id(value)]
        fields[name] = value
    return Handoff(**fields)


def release_handoff_contexts(h: Handoff) -> None:
    """Give a hand-off's contexts back to their KV cache now (after they were exported)."""
    for f in dataclasses.fields(Handoff):
        value = getattr(h, f.name)
        if isinstance(value, Context) and hasattr(value, "release"):
            value.release()
