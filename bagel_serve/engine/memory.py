"""How much KV cache each stage may hold on a GPU.

vLLM's meaning of `gpu_memory_utilization`: the share of a device's memory a stage may use in all. Our
stages on one device share one copy of the weights (one process, or worker processes that map the
parent's weights), so the shares of the stages on a device are pooled: what is left of their sum after
the weights and an activation reserve per process is the KV cache, split between those stages in
proportion to their shares. A stage that gives no share gets an equal part of
`DEFAULT_GPU_MEMORY_UTILIZATION`, so a CUDA pool is always bounded and the scheduler admits requests
within it instead of running the device out of memory mid-flight. CPU pools are not bounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

ACTIVATION_RESERVE_BYTES = 6 * 2**30
"""Kept free per process for activations (the 1024x1024 denoising step's packed forward needs ~4 GiB)."""
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


@dataclass(frozen=True)
class StagePlacement:
    device: torch.device
    utilization: float | None
    has_weights_copy: bool
    """True when this stage holds its own copy of the weights on its device (else it maps shared ones)."""


def kv_block_budgets(stages: list[StagePlacement], *, weights_bytes: int, block_bytes: int, one_process: bool,
                     total_memory: Callable[[torch.device], int] | None = None) -> list[int | None]:
    """Each stage's KV pool bound in blocks (None on the CPU), or ValueError when a device's shares leave
    no room for the KV cache."""
    total_memory = total_memory or (lambda d: torch.cuda.get_device_properties(d).total_memory)
    budgets: list[int | None] = [None] * len(stages)
    by_device: dict[torch.device, list[int]] = {}
    for i, s in enumerate(stages):
        if s.device.type == "cuda":
            by_device.setdefault(s.device, []).append(i)
    for device, idx in by_device.items():
        shares = [stages[i].utilization if stages[i].utilization is not None
                  else DEFAULT_GPU_MEMORY_UTILIZATION / len(idx) for i in idx]
        allowed = min(1.0, sum(shares)) * total_memory(device)
        copies = max(1, sum(1 for i in idx if stages[i].has_weights_copy))
        processes = 1 if one_process else len(idx)
        reserve = min(ACTIVATION_RESERVE_BYTES, 0.25 * allowed / processes) * processes
        kv = allowed - copies * weights_bytes - reserve
        gib = 2**30
        what = ", ".join(f"stage {i}: {sh:g}" for i, sh in zip(idx, shares))
        if kv < block_bytes:
            raise ValueError(
                f"gpu_memory_utilization on {device} ({what}): {allowed / gib:.1f} GiB allowed, but the weights use "
                f"{copies * weights_bytes / gib:.1f} GiB and activations need {reserve / gib:.1f} GiB: nothing is "
                f"left for the KV cache (raise gpu_memory_utilization)")
        for i, sh in zip(idx, shares):
            budgets[i] = max(1, int(kv * sh / sum(shares) // block_bytes))
    return budgets


def weights_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the modules' parameters and buffers (also for meta-device skeletons)."""
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])
