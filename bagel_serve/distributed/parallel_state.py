"""Who this process is among the ranks that shard one model (tensor parallelism).

The layers ask here for their rank and world size instead of assuming one GPU. Nothing starts process
groups yet (a deploy config with `tensor_parallel_size > 1` is refused as not built), so today the answer is
rank 0 of 1 and every collective is the identity; `set_tensor_parallel_group` is the seam where a
tensor-parallel stage will install its group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_TP_GROUP: dist.ProcessGroup | None = None


def set_tensor_parallel_group(group: dist.ProcessGroup | None) -> None:
    """Install the process group the layers shard over (None: no tensor parallelism)."""
    global _TP_GROUP
    _TP_GROUP = group


def tp_world_size() -> int:
    return 1 if _TP_GROUP is None else dist.get_world_size(_TP_GROUP)


def tp_rank() -> int:
    return 0 if _TP_GROUP is None else dist.get_rank(_TP_GROUP)


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the tensor-parallel ranks, in place (the identity at world size 1)."""
    if _TP_GROUP is not None and dist.get_world_size(_TP_GROUP) > 1:
        dist.all_reduce(x, group=_TP_GROUP)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in rank order (`x` itself at world size 1)."""
    if _TP_GROUP is None or dist.get_world_size(_TP_GROUP) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(_TP_GROUP))]
    dist.all_gather(parts, x.contiguous(), group=_TP_GROUP)
    return torch.cat(parts, dim=dim)
