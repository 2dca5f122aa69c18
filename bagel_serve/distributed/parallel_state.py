"""Who this process is among the ranks of its stage, and the process groups they share.

A stage that spreads over several GPUs (tensor parallelism, CFG parallelism, HSDP) runs one process per
rank. Rank r of a stage with TP size T is TP rank `r % T` of CFG rank `r // T`: the ranks of one TP group
are neighbours (adjacent GPUs, the fastest links). Every rank runs the same engine on the same messages
(`pipeline.lockstep`), so each collective below is reached by every rank of its group in the same order.

The layers ask here for their TP rank and world size; the runner asks for the CFG ones. With no groups
installed (one rank) every answer is rank 0 of 1 and every collective the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankLayout:
    """How one stage's ranks divide the work; `rank` is this process's place among them."""

    rank: int
    world: int
    tp: int = 1
    cfg: int = 1
    hsdp_shard: int = 1
    hsdp_replicate: int = 1
    use_hsdp: bool = False
    vae_patch_parallel: int = 1
    init_method: str = ""
    """Where the ranks meet (`tcp://host:port`), chosen by the parent that starts them."""
    seed: int = 0
    """Every rank's Python and torch RNGs start from it, so that what a request leaves to chance (an
    unseeded request's seed) comes out the same on every rank."""

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.tp


_TP_GROUP: dist.ProcessGroup | None = None
_CFG_GROUP: dist.ProcessGroup | None = None
_STAGE_GROUP: dist.ProcessGroup | None = None
_CONTROL_GROUP: dist.ProcessGroup | None = None
_VAE_GROUP: dist.ProcessGroup | None = None
_LAYOUT: RankLayout | None = None


def set_tensor_parallel_group(group: dist.ProcessGroup | None) -> None:
    """Install the process group the layers shard over (None: no tensor parallelism)."""
    global _TP_GROUP
    _TP_GROUP = group


def init_stage_groups(layout: RankLayout, device: torch.device) -> None:
    """Join the stage's ranks and build its groups: the whole stage (NCCL on CUDA, gloo on the CPU), a gloo
    group for the control messages of `pipeline.lockstep`, and the TP and CFG groups. Every rank calls this
    with the same layout (but its own `rank`)."""
    global _CFG_GROUP, _STAGE_GROUP, _CONTROL_GROUP, _VAE_GROUP, _LAYOUT
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=layout.init_method, rank=layout.rank, world_size=layout.world, **kw)
    _STAGE_GROUP = dist.group.WORLD
    _CONTROL_GROUP = dist.new_group(backend="gloo") if backend != "gloo" else _STAGE_GROUP
    tp_groups = [list(range(c * layout.tp, (c + 1) * layout.tp)) for c in range(layout.cfg)]
    cfg_groups = [list(range(t, layout.world, layout.tp)) for t in range(layout.tp)]
    # new_group is collective over the whole world: every rank builds every group, in the same order.
    for ranks in tp_groups:
        g = dist.new_group(ranks) if layout.tp > 1 else None
        if layout.rank in ranks:
            set_tensor_parallel_group(g)
    for ranks in cfg_groups:
        g = dist.new_group(ranks) if layout.cfg > 1 else None
        if layout.rank in ranks:
            _CFG_GROUP = g
    if layout.vae_patch_parallel > 1:
        g = dist.new_group(list(range(layout.vae_patch_parallel)))
        _VAE_GROUP = g if layout.rank < layout.vae_patch_parallel else None
    _LAYOUT = layout


def layout() -> RankLayout | None:
    """This process's place in its stage (None: a stage of one rank)."""
    return _LAYOUT


def vae_group() -> dist.ProcessGroup | None:
    """The ranks a tiled VAE spreads its tiles over (VAE patch parallelism: the stage's first
    `vae_patch_parallel_size` ranks), if this rank is one of them; None: tiles run here alone."""
    return _VAE_GROUP


def decodes_images() -> bool:
    """Whether this rank decodes the images its stage makes: the only rank, or one of the VAE patch-parallel
    ranks (rank 0 alone without patch parallelism). Only rank 0 sends them; the others would wait for
    nothing."""
    return _LAYOUT is None or _LAYOUT.rank < max(1, _LAYOUT.vae_patch_parallel)


def stage_group() -> dist.ProcessGroup | None:
    return _STAGE_GROUP


def control_group() -> dist.ProcessGroup | None:
    return _CONTROL_GROUP


def tp_group() -> dist.ProcessGroup | None:
    return _TP_GROUP


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


def cfg_world_size() -> int:
    return 1 if _CFG_GROUP is None else dist.get_world_size(_CFG_GROUP)


def cfg_rank() -> int:
    return 0 if _CFG_GROUP is None else dist.get_rank(_CFG_GROUP)


def cfg_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the CFG-parallel ranks, in place (the identity without CFG parallelism)."""
    if _CFG_GROUP is not None:
        dist.all_reduce(x, group=_CFG_GROUP)
    return x
