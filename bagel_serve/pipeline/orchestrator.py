"""Topologies: how request programs are spread over engines.

Single stage: one engine runs whole programs. Two stages: stage 0 (the Thinker) runs context programs —
prefill, text and think decoding — and for image requests hands a `Handoff` (the full and CFG contexts
with their RoPE positions and lengths, the output size and the RNG state) to stage 1 (the DiT), which
denoises and decodes. Each stage has its own scheduler limits from the deploy config. In this process
the hand-off passes the contexts by reference: the KV is neither copied nor serialised, and both stages
use one set of weights.
"""

from __future__ import annotations

import time
from typing import Callable

from bagel_serve.config.deploy import DeployConfig, PipelineSpec
from bagel_serve.engine.request import Request, RequestOutput
from bagel_serve.engine.runner import Handoff, RunStats, Runner
from bagel_serve.engine.scheduler import Engine, SchedulerConfig


def scheduler_config(deploy: DeployConfig, stage_id: int) -> SchedulerConfig:
    stage = deploy.stage(stage_id)
    return SchedulerConfig(max_num_seqs=stage.max_num_seqs, max_num_batched_tokens=stage.max_num_batched_tokens)


class Orchestrator:
    """Runs batches of requests through the pipeline's stages and collects their outputs."""

    def __init__(self, runner: Runner, pipeline: PipelineSpec, deploy: DeployConfig) -> None:
        self.runner = runner
        self.pipeline = pipeline
        self.configs = [scheduler_config(deploy, s.stage_id) for s in pipeline.stages]
        self.last_stats: RunStats | None = None
        self.stage_stats: list[RunStats] = []

    def generate(self, requests: list[Request], *, progress: bool = False, timed: bool = False,
                 on_token: Callable[[int, int], None] | None = None) -> list[RequestOutput]:
        """All requests, validated first (no work is done if any is bad), then run to completion.

        `on_token(request_index, token_id)` streams decoded tokens as they are produced.
        """
        prepared = [self.runner.prepare(i, r) for i, r in enumerate(requests)]
        engines = [Engine(self.runner, c, timed=timed, progress=progress) for c in self.configs]
        t0 = time.perf_counter()
        index_of: list[dict[int, int]] = [{} for _ in engines]
        for i, (req, prep) in enumerate(zip(requests, prepared)):
            cb = (lambda tok, i=i: on_token(i, tok)) if on_token else None
            if self.pipeline.single_stage:
                rid = engines[0].add_request(i, req, prep, cb)
            else:
                rid = engines[0].add_program(self.runner.context_program(i, req, prep, cb), req,
                                             self.runner.estimate_blocks(req, prep))
            index_of[0][rid] = i
        outputs: dict[int, RequestOutput] = {}
        errors: dict[int, BaseException] = {}
        while any(e.has_work() for e in engines):
            for stage, engine in enumerate(engines):
                engine.step()
                for rid, result, error in engine.pop_finished():
                    i = index_of[stage].pop(rid)
                    if error is not None:
                        errors[i] = error
                    elif isinstance(result, Handoff):
                        # Same runner, same pool: the reservation made at stage 0 covers stage 1.
                        rid = engines[stage + 1].add_program(self.runner.image_program(result), result.request,
                                                             result.reserved_blocks, reserved=True)
                        index_of[stage + 1][rid] = i
                    else:
                        outputs[i] = result
        for engine in engines:
            engine.close()
        self.stage_stats = [e.stats for e in engines]
        self.last_stats = _merge_stats(self.stage_stats, len(requests), time.perf_counter() - t0)
        return collect_outputs(requests, outputs, errors)


def collect_outputs(requests: list[Request], outputs: dict[int, RequestOutput],
                    errors: dict[int, BaseException]) -> list[RequestOutput]:
    """One output per request, in order: a request that failed gets an output carrying its error, so that
    the others of its batch are kept."""
    return [outputs[i] if i in outputs else RequestOutput(request_index=i, modality=r.modality, seed=r.seed,
                                                          error=errors[i])
            for i, r in enumerate(requests)]


def _merge_stats(stats: list[RunStats], n: int, wall: float) -> RunStats:
    out = RunStats(requests=n, wall_s=wall)
    for s in stats:
        out.forwards += s.forwards
        out.decoded_tokens += s.decoded_tokens
        out.denoise_steps += s.denoise_steps
        out.denoise_branch_evals += s.denoise_branch_evals
        out.images += s.images
        out.queue_s += s.queue_s
        out.admitted += s.admitted
        out.kv_peak_blocks = max(out.kv_peak_blocks, s.kv_peak_blocks)
        out.kv_block_bytes = max(out.kv_block_bytes, s.kv_block_bytes)
        out.kv_total_blocks = max(out.kv_total_blocks, s.kv_total_blocks)
        for k, v in s.phase_s.items():
            out.phase_s[k] = out.phase_s.get(k, 0.0) + v
    return out
