"""Fixed 2-D sin-cos position tables, the flow-time embedder and the ViT connector."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d_table(grid: int, dim: int) -> torch.Tensor:
    """Row k = r*grid + c is [sin(c w), cos(c w), sin(r w), cos(r w)]: the column half comes first.

    Computed in float64 and cast to float32 as the reference does, so a recomputed table equals the
    one stored in the checkpoint after the same rounding.
    """
    if dim % 4:
        raise ValueError(f"sin-cos table width must be divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    coords = np.arange(grid, dtype=np.float64)
    cols = np.tile(coords, grid)
    rows = np.repeat(coords, grid)

    def half(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([half(cols), half(rows)], axis=1).astype(np.float32))


class PositionEmbedding(nn.Module):
    """A frozen (grid*grid, dim) table, stored in the checkpoint as `pos_embed`."""

    def __init__(self, grid: int, dim: int) -> None:
        super().__init__()
        self.grid = grid
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, dim), requires_grad=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


def frequency_table(dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """The `dim/2` geometric frequencies of the time embedding, computed on the CPU as the reference does."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0,
                         freqs: torch.Tensor | None = None) -> torch.Tensor:
    """[cos | sin] of t (flow time in [0, 1], not scaled by 1000) at `dim/2` geometric frequencies (`freqs`:
    `frequency_table` already on t's device)."""
    if freqs is None:
        freqs = frequency_table(dim, max_period).to(t.device)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self._freqs: torch.Tensor | None = None
        """The frequency table on the device of the last call: kept there, a step copies nothing from the host
        (which a CUDA graph could not capture). Not a buffer: the checkpoint has no such tensor."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self._freqs is None or self._freqs.device != t.device:
            self._freqs = frequency_table(self.frequency_dim).to(t.device)
        freq = timestep_frequencies(t, self.frequency_dim, freqs=self._freqs)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class MLPConnector(nn.Module):
    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
