"""The ranks of one stage run one engine: rank 0 receives the parent's messages and passes each one on, so
that every rank applies the same messages at the same points and steps the same schedule.

Each engine step, rank 0 broadcasts the messages that arrived since the last one (usually none: then only
a count goes out), already decoded: a blob holding shared-memory or CUDA IPC handles is opened once, by rank
0, and what travels on is plain values, with device tensors moved to the CPU (the ranks live on different
devices; each moves what it takes to its own). An idle rank 0 still broadcasts an empty batch every
`batch_timeout`, so the other ranks never wait long enough in a collective to time out.

Nothing else decides anything per rank: the scheduler is deterministic given its messages, sampling sees the
same gathered logits with the same seeds everywhere (the ranks' Python and torch RNGs start from one seed),
and the KV cache has the same number of blocks on every rank (`agree_blocks`).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
import torch.distributed as dist

from bagel_serve.distributed.parallel_state import control_group, stage_group


class _CpuPickler(pickle.Pickler):
    """Pickles tensors by value, from the CPU."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor) and obj.device.type not in ("cpu", "meta"):
            return _rebuild, (obj.detach().cpu(),)
        return NotImplemented


def _rebuild(t: torch.Tensor) -> torch.Tensor:
    return t


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    _CpuPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def broadcast_items(items: list[Any] | None) -> list[Any]:
    """Rank 0 passes its `items` (a list); every other rank passes None and gets rank 0's list."""
    group = control_group()
    count = torch.zeros(1, dtype=torch.int64)
    payload = _dumps(items) if items else b""
    if items is not None:
        count[0] = len(payload)
    dist.broadcast(count, src=0, group=group)
    n = int(count[0])
    if n == 0:
        return items or []
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if items is not None else torch.empty(n, dtype=torch.uint8)
    dist.broadcast(data, src=0, group=group)
    if items is not None:
        return items
    return pickle.loads(data.numpy().tobytes())


def agree_blocks(blocks: int, device: torch.device) -> int:
    """The fewest KV blocks any rank of the stage can hold: every rank must admit the same requests."""
    t = torch.tensor([blocks], dtype=torch.int64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=stage_group())
    return int(t[0])
