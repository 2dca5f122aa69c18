"""Continuous batching: which requests run, and which of their pending work goes into the next forward.

A waiting queue and a running set. Admission is FIFO up to `max_num_seqs` and within the KV cache's
admission ledger: a request starts only when an upper bound of the blocks it can hold
(`preprocess.estimate_blocks`) fits beside the reservations of the running ones, so an admitted request
never runs out of blocks mid-flight — it waits instead, and one that could never fit fails alone with the
numbers. Each step takes the running requests' pending units, FIFO, within `max_num_batched_tokens` rows; a
lone prompt segment that does not fit is prefilled in chunks across steps (chunked prefill).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from bagel_serve.engine.block_manager import BlockManager, PoolExhausted
from bagel_serve.engine.sequence import RequestState, Work
from bagel_serve.model.layout import TextPiece


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 32768

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _splittable(unit: list[Work]) -> bool:
    """Only a lone causal prompt segment may be prefilled in chunks (its rows only need earlier rows)."""
    w = unit[0]
    return len(unit) == 1 and isinstance(w.piece, TextPiece) and w.commit and not w.want_output


class Scheduler:
    def __init__(self, config: SchedulerConfig, manager: BlockManager) -> None:
        self.config = config
        self.manager = manager
        self.waiting: deque[RequestState] = deque()
        self.running: dict[int, RequestState] = {}

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self, start: Callable[[RequestState], None], fail: Callable[[RequestState, BaseException], None]) -> None:
        """Move waiting requests to running (calling `start` on each) while there is room. A request whose
        blocks were reserved upstream (a hand-off) needs no room in the ledger."""
        m = self.manager
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            state = self.waiting[0]
            if not state.reserved:
                if state.blocks > m.capacity:
                    self.waiting.popleft()
                    fail(state, PoolExhausted(
                        f"request needs up to {state.blocks} KV blocks but the cache holds {m.capacity} "
                        f"(raise gpu_memory_utilization or kv_cache_blocks, or lower max_tokens / max_think_tokens "
                        f"/ the image size)"))
                    continue
                if not m.try_admit(state.blocks):
                    break
                state.reserved = True
            self.waiting.popleft()
            self.running[state.rid] = state
            start(state)

    def schedule(self) -> tuple[list[Work], list[RequestState], list[RequestState]]:
        """This step's work: each running request's pending unit, FIFO, within the row budget.

        A unit too large for what is left waits for the next step, unless it is a lone prompt segment,
        whose head is prefilled now and whose rest stays pending (chunked prefill), or the step would
        otherwise be empty. Returns the works, their owners, and the requests whose whole unit runs."""
        budget = self.config.max_num_batched_tokens
        works: list[Work] = []
        owners: list[RequestState] = []
        complete: list[RequestState] = []
        for state in list(self.running.values()):
            if budget <= 0:
                break
            unit = state.pending
            if not unit:
                continue
            rows = sum(w.rows for w in unit)
            if rows > budget:
                if _splittable(unit):
                    w = unit[0]
                    head = Work(w.context, TextPiece(w.piece.ids[:budget]), commit=True, phase=w.phase)
                    state.pending = [Work(w.context, TextPiece(w.piece.ids[budget:]), commit=True, phase=w.phase)]
                    works.append(head)
                    owners.append(state)
                    break
                if works:
                    continue
            works += unit
            owners += [state] * len(unit)
            complete.append(state)
            budget -= rows
        return works, owners, complete
