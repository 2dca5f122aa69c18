"""One stage: what it computes with (`Stage`: model runner, request programs, KV cache) and its loop
(`Engine`: admit, schedule, run one packed forward, resume the programs whose work is done).

The same engine class serves the single stage, stage 0 (context programs) and stage 1 (image programs)
of the two-stage topology. A request that arrives while others decode joins at the next step; a denoising
request joins the others' next denoising step. A request whose program fails ends with its error; the
others go on.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from bagel_serve.config.model_config import BagelConfig
from bagel_serve.engine.diffusion import Handoff, ImagePrograms, VaeMode
from bagel_serve.engine.kv_cache import KVCache
from bagel_serve.engine.preprocess import Prepared, estimate_blocks, prepare
from bagel_serve.engine.request import Request, RequestOutput
from bagel_serve.engine.runner import ModelRunner, reserve_blocks
from bagel_serve.engine.scheduler import Scheduler, SchedulerConfig
from bagel_serve.engine.sequence import Program, RequestState, Work
from bagel_serve.engine.stats import RunStats
from bagel_serve.engine.text import TextPrograms, TokenCallback, tokens_made
from bagel_serve.engine.tokenizer import BagelTokenizer
from bagel_serve.model.autoencoder import AutoEncoder
from bagel_serve.model.bagel import Bagel


class Stage:
    """A model, its VAE and tokenizer, one KV cache, the model runner over them and the request programs."""

    def __init__(self, model: Bagel, vae: AutoEncoder, tokenizer: BagelTokenizer, cache: KVCache, *,
                 max_num_seqs: int = 256, max_model_len: int | None = None, enforce_eager: bool = False,
                 attention_backend: str | None = None, vae_mode: VaeMode = VaeMode(),
                 denoise_graph_sizes: tuple[tuple[int, int], ...] | None = ()) -> None:
        self.model = model
        self.vae = vae
        self.tok = tokenizer
        self.cfg: BagelConfig = model.config
        self.cache = cache
        self.max_model_len = max_model_len or self.cfg.llm.max_position_embeddings
        self.runner = ModelRunner(model, cache, tokenizer.special, max_num_seqs=max_num_seqs,
                                  max_model_len=self.max_model_len, enforce_eager=enforce_eager,
                                  attention_backend=attention_backend, denoise_graph_sizes=denoise_graph_sizes)
        self.timed = False
        self.vae_warmup_s = 0.0
        """Seconds spent readying the VAE's kernels at start (`diffusion.warm_up_vae`; 0 on the CPU)."""
        self.text = TextPrograms(self.cfg, tokenizer, cache, vae, self.now, vae_mode)
        self.images = ImagePrograms(self.cfg, vae, model.device, self.now, model.velocity, vae_mode)

    def now(self) -> float:
        """A clock for phase timings: synchronised with the device when timing was asked for."""
        if self.timed and self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        return time.perf_counter()

    def prepare(self, index: int, req: Request) -> Prepared:
        return prepare(index, req, self.cfg, self.tok, self.max_model_len)

    def estimate_blocks(self, req: Request, prep: Prepared) -> int:
        return estimate_blocks(req, prep, self.cfg, self.tok, self.cache.block_size)

    def program(self, index: int, req: Request, prep: Prepared, on_token: TokenCallback | None = None) -> Program:
        """The whole request, as the single-stage topology runs it."""
        result = yield from self.text.context_program(index, req, prep, on_token)
        if isinstance(result, Handoff):
            result = yield from self.image_program(result)
        return result

    def context_program(self, index: int, req: Request, prep: Prepared, on_token: TokenCallback | None = None):
        return self.text.context_program(index, req, prep, on_token)

    def image_program(self, h: Handoff):
        """Denoise and decode a hand-off; its contexts are released when the program ends, however it ends."""
        try:
            return (yield from self.images.image_program(h))
        finally:
            release_contexts(h)

    @torch.inference_mode()
    def run_alone(self, program: Program) -> Any:
        """Drive one program to its end with no scheduler (its forwards unpacked): for tests and debugging."""
        sent = None
        while True:
            try:
                works = program.send(sent) if sent is not None else next(program)
            except StopIteration as stop:
                return stop.value
            reserve_blocks(works)
            sent = self.runner.execute(works)


def release_contexts(h: Any) -> None:
    """Give a hand-off's contexts back to their cache now (after they were used or exported)."""
    if isinstance(h, Handoff):
        for c in (h.full, h.cfg_text, h.cfg_img):
            if c is not None:
                c.release()


GATHER_QUIET_S = 0.003
"""While an engine is idle, requests that arrive less than this apart are gathered into its first forward
(`Engine.hold_s`): a burst of HTTP requests reaches the engine over a hundred milliseconds or more, one every
few milliseconds, and starting on the first alone splits the burst's prefill over several forwards, with the
early requests' decode rows run eagerly inside them."""
GATHER_MAX_S = 0.25
"""The longest an idle engine holds its first forward for a burst still arriving."""


class Engine:
    """One scheduler loop over one stage. Not thread-safe: drive it from one thread."""

    def __init__(self, stage: Stage, config: SchedulerConfig | None = None, *, timed: bool = False,
                 progress: bool = False) -> None:
        self.stage = stage
        self.config = config or SchedulerConfig()
        self.scheduler = Scheduler(self.config, stage.cache.manager)
        self.timed = timed
        self.progress = progress
        self.finished: dict[int, RequestState] = {}
        self.stats = RunStats()
        self.on_denoise_step: Callable[[int], None] | None = None
        """Called with a request's id after each denoising step that ran a forward for it (progress)."""
        self.gathers = False
        """Whether the loop driving this engine holds an idle engine's first step for a burst of arrivals
        (`hold_s`). The ranks of a multi-rank stage never do: they must step at the same points."""
        self._next_id = 0
        self._bars: dict[str, tqdm] = {}

    @property
    def running(self) -> dict[int, RequestState]:
        return self.scheduler.running

    @property
    def waiting(self):
        return self.scheduler.waiting

    # ------------------------------------------------------------------ intake
    def add_program(self, program: Program, request: Request, blocks: int = 0, *, reserved: bool = False) -> int:
        """Queue a program; `blocks` is the KV cache space it may need (see `Stage.estimate_blocks`).

        `reserved`: those blocks are already reserved in this cache's admission ledger (a hand-off from an
        engine on the same cache passes its reservation on); the engine gives them back when it finishes."""
        rid = self._next_id
        self._next_id += 1
        self.scheduler.waiting.append(RequestState(rid, program, request, blocks=blocks, reserved=reserved))
        return rid

    def add_request(self, index: int, request: Request, prepared: Prepared | None = None,
                    on_token: Callable[[int], None] | None = None) -> int:
        """Queue a whole request (single stage). `prepared` is `stage.prepare(...)`'s result."""
        prep = prepared if prepared is not None else self.stage.prepare(index, request)
        return self.add_program(self.stage.program(index, request, prep, on_token), request,
                                self.stage.estimate_blocks(request, prep))

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def hold_s(self) -> float:
        """Seconds the driving loop should wait (for more arrivals) before the next `step`; 0: step now.
        Only an idle engine (nothing running) with `gathers` holds, while requests keep arriving less than
        GATHER_QUIET_S apart, and for at most GATHER_MAX_S after the first of them."""
        waiting = self.scheduler.waiting
        if not self.gathers or self.scheduler.running or not waiting:
            return 0.0
        until = min(waiting[-1].queued_at + GATHER_QUIET_S, waiting[0].queued_at + GATHER_MAX_S)
        return max(0.0, until - time.perf_counter())

    def cancel(self, rid: int, error: BaseException) -> bool:
        """End a waiting or running request now with `error` (its program is closed, which drops its contexts
        and gives back its admission reservation); False when the engine does not hold it. Call it between
        steps, from the thread that steps."""
        for state in self.scheduler.waiting:
            if state.rid == rid:
                self.scheduler.waiting.remove(state)
                self._fail(state, error)
                return True
        state = self.scheduler.running.get(rid)
        if state is None:
            return False
        self._fail(state, error)
        return True

    def pop_finished(self) -> list[tuple[int, Any, BaseException | None]]:
        done = [(rid, s.result, s.error) for rid, s in self.finished.items()]
        self.finished.clear()
        return done

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def step(self) -> None:
        """Admit, schedule, run one packed forward, resume the programs whose work is done."""
        self.scheduler.admit(self._start, self._fail)
        works, owners, complete = self.scheduler.schedule()
        if not works:
            return
        stage = self.stage
        stage.timed = self.timed
        t0 = stage.now()
        try:
            reserve_blocks(works)
            results = stage.runner.execute(works)
        except Exception as e:  # a failed forward fails the requests in it, not the engine
            for state in {s.rid: s for s in owners}.values():
                self._fail(state, e)
            return
        by_rid: dict[int, list[Any]] = {}
        for state, res in zip(owners, results):
            by_rid.setdefault(state.rid, []).append(res)
        self._account(works, owners, by_rid, stage.now() - t0)
        usage = stage.cache.manager
        self.stats.kv_peak_blocks = max(self.stats.kv_peak_blocks, usage.num_used)
        self.stats.kv_block_bytes, self.stats.kv_total_blocks = stage.cache.bytes_per_block, usage.capacity
        for state in complete:
            self._advance(state, by_rid[state.rid])

    def run(self) -> Iterator[tuple[int, Any, BaseException | None]]:
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
    def _start(self, state: RequestState) -> None:
        self.stats.queue_s += time.perf_counter() - state.queued_at
        self.stats.admitted += 1
        self._advance(state, None)

    def _advance(self, state: RequestState, sent: list[Any] | None) -> None:
        try:
            state.pending = state.program.send(sent) if sent is not None else next(state.program)
        except StopIteration as stop:
            state.result = stop.value
            self._finish(state)
        except Exception as e:
            self._fail(state, e)

    def _fail(self, state: RequestState, error: BaseException) -> None:
        state.error = error
        state.program.close()
        self._finish(state)

    def _finish(self, state: RequestState) -> None:
        state.pending = None
        self.scheduler.running.pop(state.rid, None)
        self.finished[state.rid] = state
        if state.reserved:
            # A hand-off's contexts live on: its reservation goes with it, to whoever ends their life.
            if isinstance(state.result, Handoff) and state.error is None:
                state.result.reserved_blocks = state.blocks
            else:
                self.stage.cache.manager.unadmit(state.blocks)
            state.reserved = False
        if isinstance(state.result, RequestOutput):
            state.result.timings = {**state.timings, **state.result.timings}
            for phase in ("vae_encode", "vae_decode"):
                if phase in state.result.timings:
                    self.stats.phase_s[phase] = self.stats.phase_s.get(phase, 0.0) + state.result.timings[phase]
            self.stats.images += len(state.result.images)

    def _account(self, works: list[Work], owners: list[RequestState], results: dict[int, list[Any]],
                 dt: float) -> None:
        st = self.stats
        st.forwards += 1
        st.graph_forwards += self.stage.runner.graphed
        units: dict[int, tuple[RequestState, list[Work]]] = {}
        for w, s in zip(works, owners):
            units.setdefault(s.rid, (s, []))[1].append(w)
        phases = set()
        st.max_batch_requests = max(st.max_batch_requests, len(units))
        if len(units) > 1:
            st.shared_forwards += 1
        for s, unit in units.values():
            phase = unit[0].phase
            phases.add(phase)
            s.timings[phase] = s.timings.get(phase, 0.0) + dt
            if phase == "denoise":
                st.denoise_steps += 1
                st.denoise_branch_evals += len(unit)
                self._bar("denoising", "step").update(1)
                if self.on_denoise_step is not None:
                    self.on_denoise_step(s.rid)
            elif phase in ("decode", "think_decode"):
                made = tokens_made(results[s.rid][0], self.stage.tok.special.eos)
                st.decoded_tokens += made
                self._bar("decoding", "tok").update(made)
        for phase in phases:
            st.phase_s[phase] = st.phase_s.get(phase, 0.0) + dt

    def _bar(self, desc: str, unit: str) -> tqdm:
        if desc not in self._bars:
            self._bars[desc] = tqdm(desc=desc, unit=unit, disable=not self.progress)
        return self._bars[desc]
