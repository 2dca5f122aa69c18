"""Continuous batching over request programs.

An `Engine` keeps a waiting queue and a running set. Every `step()` admits waiting requests up to
`max_num_seqs`, picks the pending work of running requests up to `max_num_batched_tokens` rows (a long
prompt segment is prefilled in chunks across steps), runs it as one packed forward, and resumes the
programs whose work is done. A request that arrives while others decode joins at the next step; a
denoising request joins the others' next denoising step. The same engine class serves the single stage,
stage 0 (context programs) and stage 1 (image programs) of the two-stage topology.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from bagel_serve.engine.batch import TextPiece, gen_rows, und_rows
from bagel_serve.engine.kv_cache import PoolExhausted
from bagel_serve.engine.request import Request, RequestOutput
from bagel_serve.engine.runner import Handoff, Program, RunStats, Runner, Work


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 32768

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")


@dataclass
class _State:
    rid: int
    program: Program
    request: Request
    pending: list[Work] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    result: RequestOutput | Handoff | None = None
    error: BaseException | None = None
    queued_at: float = field(default_factory=time.perf_counter)
    blocks: int = 0
    """KV pool blocks this request may hold at once (admission reserves them)."""
    reserved: bool = False
    """Whether `blocks` are reserved in the pool's admission ledger (by us, or upstream)."""


def _rows(work: Work) -> int:
    return und_rows(work.piece) + gen_rows(work.piece)


def _splittable(unit: list[Work]) -> bool:
    """Only a lone causal prompt segment may be prefilled in chunks (its rows only need earlier rows)."""
    w = unit[0]
    return len(unit) == 1 and isinstance(w.piece, TextPiece) and w.commit and not w.want_output


class Engine:
    """One scheduler loop over one runner (model). Not thread-safe: drive it from one thread."""

    def __init__(self, runner: Runner, config: SchedulerConfig | None = None, *, timed: bool = False,
                 progress: bool = False) -> None:
        self.runner = runner
        self.config = config or SchedulerConfig()
        self.timed = timed
        self.progress = progress
        self.waiting: deque[_State] = deque()
        self.running: dict[int, _State] = {}
        self.finished: dict[int, _State] = {}
        self.stats = RunStats()
        self._next_id = 0
        self._bars: dict[str, tqdm] = {}

    # ------------------------------------------------------------------ intake
    def add_program(self, program: Program, request: Request, blocks: int = 0, *, reserved: bool = False) -> int:
        """Queue a program; `blocks` is the KV pool space it may need (see `Runner.estimate_blocks`).

        `reserved`: those blocks are already reserved in this pool's admission ledger (a hand-off from an
        engine on the same pool passes its reservation on); the engine gives them back when it finishes."""
        rid = self._next_id
        self._next_id += 1
        self.waiting.append(_State(rid, program, request, blocks=blocks, reserved=reserved))
        return rid

    def add_request(self, index: int, request: Request, prepared: Any = None,
                    on_token: Callable[[int], None] | None = None) -> int:
        """Queue a whole request (single stage). `prepared` is `runner.prepare(...)`'s result."""
        prep = prepared if prepared is not None else self.runner.prepare(index, request)
        return self.add_program(self.runner.program(index, request, prep, on_token), request,
                                self.runner.estimate_blocks(request, prep))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def pop_finished(self) -> list[tuple[int, RequestOutput | Handoff | None, BaseException | None]]:
        done = [(rid, s.result, s.error) for rid, s in self.finished.items()]
        self.finished.clear()
        return done

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def step(self) -> None:
        """Admit, schedule, run one packed forward, resume the programs whose work is done."""
        self._admit()
        works, owners, complete = self._schedule()
        if not works:
            return
        self.runner._timed = self.timed
        t0 = self.runner._now()
        try:
            results = self.runner._forward(works)
        except Exception as e:  # a failed forward fails the requests in it, not the engine
            for state in {s.rid: s for s in owners}.values():
                self._fail(state, e)
            return
        self._account(works, owners, self.runner._now() - t0)
        pool = self.runner.pool
        self.stats.kv_peak_blocks = max(self.stats.kv_peak_blocks, pool.num_blocks_used)
        self.stats.kv_block_bytes, self.stats.kv_total_blocks = pool.bytes_per_block, pool.capacity_blocks
        by_rid: dict[int, list[Any]] = {}
        for state, res in zip(owners, results):
            by_rid.setdefault(state.rid, []).append(res)
        for state in complete:
            self._advance(state, by_rid[state.rid])

    def run(self) -> Iterator[tuple[int, RequestOutput | Handoff | None, BaseException | None]]:
        """Step until everything queued has finished, yielding results as they come."""
        while self.has_work():
            self.step()
            yield from self.pop_finished()
        self.close()

    def close(self) -> None:
        """Close the progress bars (the engine can be used again afterwards)."""
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    # ------------------------------------------------------------------ internals
    def _admit(self) -> None:
        """FIFO admission up to max_num_seqs and, when the KV pool is bounded, within its admission
        ledger: a request waits until running ones leave room, and one that could never fit fails with
        the numbers. A request whose blocks were reserved upstream (a hand-off) needs no room."""
        pool = self.runner.pool
        limit = pool.max_blocks
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            state = self.waiting[0]
            if not state.reserved:
                if limit is not None and state.blocks > limit:
                    self.waiting.popleft()
                    self._fail(state, PoolExhausted(
                        f"request needs up to {state.blocks} KV blocks but the pool holds at most {limit} "
                        f"(raise gpu_memory_utilization, or lower max_tokens / max_think_tokens / image size)"))
                    continue
                if not pool.try_admit(state.blocks):
                    break
                state.reserved = True
            state = self.waiting.popleft()
            self.stats.queue_s += time.perf_counter() - state.queued_at
            self.stats.admitted += 1
            self.running[state.rid] = state
            self._advance(state, None)

    def _advance(self, state: _State, sent: list[Any] | None) -> None:
        try:
            state.pending = state.program.send(sent) if sent is not None else next(state.program)
        except StopIteration as stop:
            state.result = stop.value
            self._finish(state)
        except Exception as e:
            self._fail(state, e)

    def _fail(self, state: _State, error: BaseException) -> None:
        state.error = error
        state.program.close()
        self._finish(state)

    def _finish(self, state: _State) -> None:
        state.pending = None
        self.running.pop(state.rid, None)
        self.finished[state.rid] = state
        if state.reserved:
            # A hand-off's contexts live on: its reservation goes with it, to whoever ends their life.
            if isinstance(state.result, Handoff) and state.error is None:
                state.result.reserved_blocks = state.blocks
            else:
                self.runner.pool.unadmit(state.blocks)
            state.reserved = False
        if isinstance(state.result, RequestOutput):
            state.result.timings = {**state.timings, **state.result.timings}
            for phase in ("vae_encode", "vae_decode"):
                if phase in state.result.timings:
                    self.stats.phase_s[phase] = self.stats.phase_s.get(phase, 0.0) + state.result.timings[phase]
            self.stats.images += len(state.result.images)

    def _schedule(self) -> tuple[list[Work], list[_State], list[_State]]:
        """This step's work: each running request's pending unit, FIFO, within the row budget.

        A unit too large for what is left waits for the next step, unless it is a lone prompt segment,
        whose head is prefilled now and whose rest stays pending (chunked prefill), or the step would
        otherwise be empty. Returns the works, their owners, and the requests whose whole unit runs.
        """
        budget = self.config.max_num_batched_tokens
        works: list[Work] = []
        owners: list[_State] = []
        complete: list[_State] = []
        for state in list(self.running.values()):
            if budget <= 0:
                break
            unit = state.pending
            if not unit:
                continue
            rows = sum(_rows(w) for w in unit)
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

    def _account(self, works: list[Work], owners: list[_State], dt: float) -> None:
        st = self.stats
        st.forwards += 1
        units: dict[int, tuple[_State, list[Work]]] = {}
        for w, s in zip(works, owners):
            units.setdefault(s.rid, (s, []))[1].append(w)
        phases = set()
        for s, unit in units.values():
            phase = unit[0].phase
            phases.add(phase)
            s.timings[phase] = s.timings.get(phase, 0.0) + dt
            if phase == "denoise":
                st.denoise_steps += 1
                st.denoise_branch_evals += len(unit)
                self._bar("denoising", "step").update(1)
            elif phase in ("decode", "think_decode"):
                st.decoded_tokens += 1
                self._bar("decoding", "tok").update(1)
        for phase in phases:
            st.phase_s[phase] = st.phase_s.get(phase, 0.0) + dt

    def _bar(self, desc: str, unit: str) -> tqdm:
        if desc not in self._bars:
            self._bars[desc] = tqdm(desc=desc, unit=unit, disable=not self.progress)
        return self._bars[desc]
