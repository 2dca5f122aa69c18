"""What request programs ask the model runner for, and the per-request state the scheduler reads."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generator

from bagel_serve.engine.kv_cache import Context
from bagel_serve.model.layout import Piece, TextPiece, piece_rows

if TYPE_CHECKING:
    from bagel_serve.engine.request import Request, RequestOutput
    from bagel_serve.engine.sampling import Sampler


DECODE_STEPS = 4
"""Decode steps a graph replay runs on the device before the host reads their tokens (greedy batches): the
host's work between steps, otherwise paid every token, is paid once per this many."""


@dataclass
class Work:
    """One piece of one sequence in a forward: append it to `context` (commit) or only attend with it.

    With `want_output` the runner returns a result for it: the sampled next tokens when a `sampler` is given
    (text: a list of 1 to `steps` tokens, each fed back in turn, for a decode step that may run several
    steps on the device), else the logits of its last row (text) or the velocity of its latents (image);
    with `want_hidden` a latent work gets (velocity, hidden rows of its latents before the final norm), what
    step caching (`engine.step_cache`) extrapolates from."""

    context: Context
    piece: Piece
    commit: bool = True
    want_output: bool = False
    phase: str = "context_prefill"
    sampler: "Sampler | None" = None
    steps: int = 1
    """Decode steps the runner may take for this work in one go (rows reserved for each)."""
    want_hidden: bool = False
    """A latent work with `want_output`: also return its latents' final hidden rows (before the norm)."""
    cfg_branch: int | None = None
    """For a denoising work, its CFG branch (0 conditional, 1 text-dropped, 2 image-dropped): under CFG
    parallelism the rank `cfg_branch % cfg_parallel_size` computes it and the others receive its result."""

    @property
    def rows(self) -> int:
        return piece_rows(self.piece) + self.steps - 1

    @property
    def is_decode(self) -> bool:
        """A one-token causal step that stays in its context: what the batched decode path runs."""
        return self.commit and isinstance(self.piece, TextPiece) and self.piece.ids.shape[0] == 1


Program = Generator[list[Work], list[Any], Any]
"""A request program yields the works it needs next and receives one result per work."""


@dataclass
class RequestState:
    """A request inside one stage's engine."""

    rid: int
    program: Program
    request: "Request"
    pending: list[Work] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    result: Any = None
    error: BaseException | None = None
    queued_at: float = field(default_factory=time.perf_counter)
    blocks: int = 0
    """KV cache blocks this request may hold at once (admission reserves them)."""
    reserved: bool = False
    """Whether `blocks` are reserved in the cache's admission ledger (by us, or upstream)."""
