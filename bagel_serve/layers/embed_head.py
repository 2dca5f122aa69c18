"""Token embedding and LM head, split over the vocabulary under tensor parallelism.

Each rank holds a contiguous slice of the vocabulary: the embedding looks up the ids it owns (zeros for the
others) and the partial rows are summed over the ranks; the LM head computes its slice of the logits and
the slices are gathered, so sampling always sees the whole vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bagel_serve.distributed import parallel_state as ps
from bagel_serve.layers.linear import ColumnParallelLinear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        world = ps.tp_world_size()
        self.num_embeddings = num_embeddings
        self.per_rank = -(-num_embeddings // world)
        self.start = ps.tp_rank() * self.per_rank
        local = max(0, min(self.per_rank, num_embeddings - self.start))
        self.weight = nn.Parameter(torch.empty(local, embedding_dim), requires_grad=False)

    def checkpoint_tensors(self, param_name: str) -> dict:
        return {None: (None, (self.num_embeddings, self.weight.shape[1]))}

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if loaded.shape[0] != self.num_embeddings or loaded.shape[1] != param.shape[1]:
            raise ValueError(f"expected a tensor of shape {(self.num_embeddings, param.shape[1])}, got {tuple(loaded.shape)}")
        param.data.copy_(loaded.narrow(0, self.start, param.shape[0]))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ps.tp_world_size() == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[:, None], 0)
        return ps.tp_all_reduce(out)


class ParallelLMHead(ColumnParallelLinear):
    """Logits over the whole vocabulary (each rank computes its slice, then they are gathered)."""

    def __init__(self, hidden_size: int, vocab_size: int, **kw: object) -> None:
        super().__init__(hidden_size, vocab_size, bias=False, **kw)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if ps.tp_world_size() == 1:
            return super().forward(x, out)
        logits = ps.tp_all_gather(super().forward(x), dim=-1)
        return logits if out is None else out.copy_(logits)
