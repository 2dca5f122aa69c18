"""The Python API: `Omni(model, ...).generate(requests)`; the CLI and the server are built on it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from bagel_serve.config.deploy import (
    DeployConfig,
    PipelineSpec,
    apply_overrides,
    default_deploy_config,
    load_deploy_config,
    resolve_pipeline,
)
from bagel_serve.config.engine_options import EngineOptions
from bagel_serve.engine.request import Request, RequestOutput, make_request
from bagel_serve.engine.runner import Runner, RunStats
from bagel_serve.pipeline.orchestrator import Orchestrator
from bagel_serve.engine.tokenizer import BagelTokenizer
from bagel_serve.model.loader import load_model, read_config, resolve_model_dir


class Omni:
    """One loaded BAGEL model serving all four modalities.

    `model` is a checkpoint directory or a Hugging Face repo id. Weights are bf16 on CUDA and float32 on
    the CPU unless `dtype` says otherwise. `deploy_config` is a deploy YAML in the seed system's schema
    (default: the bundled one for the model's topology); the other keyword arguments are the seed's engine
    options (`tensor_parallel_size`, `cfg_parallel_size`, `vae_patch_parallel_size`, `vae_use_tiling`,
    `quantization`, `worker_backend`, `ray_address`, `log_stats`, `init_timeout`, `batch_timeout`,
    `enable_diffusion_pipeline_profiler`, `stage_overrides`, ...). An option whose feature is not built yet
    fails by name rather than being ignored.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        deploy_config: str | os.PathLike | None = None,
        progress: bool = False,
        **kwargs: Any,
    ) -> None:
        self.options = EngineOptions.from_kwargs(kwargs)
        model_dir = resolve_model_dir(model)
        read_config(model_dir)  # a broken checkpoint config is reported as such, before the deploy config
        config_json = _read_config_json(model_dir)
        deploy = load_deploy_config(deploy_config or default_deploy_config(config_json))
        deploy = apply_overrides(deploy, self.options.deploy_overrides(), self.options.stage_overrides)
        self.pipeline: PipelineSpec = resolve_pipeline(deploy, config_json)
        self.options.require_runnable(self.pipeline.num_stages)
        deploy.require_runnable()
        self.deploy_config: DeployConfig = deploy
        if isinstance(dtype, str):
            dtype = _parse_dtype(dtype)
        self.model_name = str(model)
        loaded = load_model(model_dir, device=device, dtype=dtype, progress=progress)
        self.config = loaded.config
        self.model_dir = loaded.model_dir
        self.tokenizer = BagelTokenizer(loaded.model_dir)
        self.runner = Runner(loaded.model, loaded.vae, self.tokenizer)
        if self.pipeline.single_stage:
            _bound_kv_pool(self.runner, deploy.stage(0).gpu_memory_utilization)
        self.progress = progress
        if self.pipeline.num_stages > 1 and self.options.worker_backend in ("process", "multi_process"):
            from bagel_serve.pipeline.workers import ProcessOrchestrator

            self.orchestrator = ProcessOrchestrator(self.runner, self.pipeline, deploy, self.options,
                                                    model_dir=loaded.model_dir)
        else:
            self.orchestrator = Orchestrator(self.runner, self.pipeline, deploy)

    def shutdown(self) -> None:
        """Stop the stage worker processes, if any (idempotent; also done at exit). The in-process
        topologies have nothing to stop."""
        stop = getattr(self.__dict__.get("orchestrator"), "shutdown", None)
        if stop is not None:
            stop()

    def __enter__(self) -> "Omni":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def device(self) -> torch.device:
        return self.runner.model.device

    @property
    def last_stats(self) -> RunStats | None:
        """Per-phase times and throughput of the last `generate` call."""
        return self.orchestrator.last_stats

    def generate(self, requests: Request | dict[str, Any] | Iterable[Request | dict[str, Any]], *,
                 on_token: Callable[[int, int], None] | None = None) -> list[RequestOutput]:
        """Run requests (dicts or `Request`s) together; one output per request, in order.

        `on_token(request_index, token_id)` receives decoded tokens (answers and think plans) as they come.
        """
        if isinstance(requests, (Request, dict)):
            requests = [requests]
        reqs = [make_request(r, i) for i, r in enumerate(requests)]
        timed = self.options.log_stats or self.options.enable_diffusion_pipeline_profiler
        return self.orchestrator.generate(reqs, progress=self.progress, timed=timed, on_token=on_token)


ACTIVATION_RESERVE_BYTES = 6 * 2**30


def _bound_kv_pool(runner: Runner, utilization: float | None) -> None:
    """With `gpu_memory_utilization`, the KV pool gets what the share leaves after the weights and an
    activation reserve, and the scheduler admits requests within it; without it the pool grows freely."""
    dev = runner.model.device
    if utilization is None or dev.type != "cuda":
        return
    allowed = utilization * torch.cuda.get_device_properties(dev).total_memory
    reserve = min(ACTIVATION_RESERVE_BYTES, 0.25 * allowed)
    kv_bytes = allowed - torch.cuda.memory_allocated(dev) - reserve
    blocks = int(kv_bytes // runner.pool.bytes_per_block)
    if blocks < 1:
        raise ValueError(f"gpu_memory_utilization {utilization}: {allowed / 2**30:.1f} GiB allowed, but the weights use "
                         f"{torch.cuda.memory_allocated(dev) / 2**30:.1f} GiB and activations need "
                         f"{reserve / 2**30:.1f} GiB: nothing is left for the KV cache")
    runner.pool.max_blocks = blocks


def _read_config_json(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / "config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # the loader reports the broken file with its own message


def _parse_dtype(name: str) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be one of {', '.join(table)}, got {name!r}")
    return table[name]
