"""The metadata of one forward, set by the runner before the model runs and read by the layers.

A forward is a flat batch of token rows from many sequences (requests, CFG branches). The runner lays the
rows out once — decode steps first, then the other understanding rows, then the generation rows — and
describes them here; the model never calls back into the engine. Layers read what they need: the expert
split (`n_und`), RoPE positions, where committed rows' K/V go in the cache (`slot_mapping`), and how each
sequence attends (`decode` for the one-token steps, `sequences` for everything else).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch

from bagel_serve.layers.attention_backends import (AttentionBackend, DecodeBatch, PackedAttention,
                                                   SequenceAttention, select_backend)


@dataclass
class ForwardContext:
    n_und: int
    """Rows [0, n_und) run the understanding expert, the rest the generation expert."""
    positions: torch.Tensor
    """int64 [rows]: each row's RoPE position (an image block shares one)."""
    slot_mapping: torch.Tensor | None
    """int64 [rows]: the cache slot each row's K/V is stored in, -1 for rows that are not stored."""
    kv_cache: torch.Tensor | None
    """[layers, 2, slots, kv heads, head dim]: layer l's keys are kv_cache[l, 0], its values kv_cache[l, 1]."""
    backend: AttentionBackend
    decode: DecodeBatch | None = None
    sequences: list[SequenceAttention] = field(default_factory=list)
    packed: PackedAttention | None = None
    """Set instead of `sequences` when the backend takes them all in one call (`AttentionBackend.packs`)."""


_LOCAL = threading.local()


def current_forward_context() -> ForwardContext | None:
    return getattr(_LOCAL, "ctx", None)


def backend_for(device: torch.device) -> AttentionBackend:
    """The running forward's backend, or the default one for `device` outside a forward (a module called
    on its own, as tests do)."""
    ctx = current_forward_context()
    return ctx.backend if ctx is not None else select_backend(device)


def get_forward_context() -> ForwardContext:
    ctx = current_forward_context()
    if ctx is None:
        raise RuntimeError("no forward context is set: the model runs only inside `forward_context(...)`")
    return ctx


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Make `ctx` the metadata of the forward run inside this block (per thread: stages may share a process)."""
    prev = getattr(_LOCAL, "ctx", None)
    _LOCAL.ctx = ctx
    try:
        yield ctx
    finally:
        _LOCAL.ctx = prev
