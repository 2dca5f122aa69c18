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
from bagel_serve.engine.memory import StagePlacement, kv_block_budgets, weights_bytes
from bagel_serve.model.loader import default_device, default_dtype, load_model, load_skeleton, read_config, resolve_model_dir


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
        self._device = torch.device(device) if device is not None else default_device()
        if self.options.uses_ray:
            # The actors load the weights where they run; here a skeleton validates the requests.
            loaded = load_skeleton(model_dir, dtype=dtype or default_dtype(self._device))
        else:
            loaded = load_model(model_dir, device=self._device, dtype=dtype, progress=progress)
        self.config = loaded.config
        self.model_dir = loaded.model_dir
        self.tokenizer = BagelTokenizer(loaded.model_dir)
        self.runner = Runner(loaded.model, loaded.vae, self.tokenizer,
                             enable_prefix_caching=deploy.prefix_caching_enabled(0))
        self.progress = progress
        backend = self.options.worker_backend
        if self.options.uses_ray:
            from bagel_serve.pipeline.ray_workers import RayOrchestrator

            where = str(model_dir.resolve()) if Path(model).expanduser().is_dir() else str(model)
            self.orchestrator = RayOrchestrator(self.runner, self.pipeline, deploy, self.options, model=where,
                                                device=self._device, dtype=loaded.model.dtype)
        elif self.pipeline.num_stages > 1 and backend in ("process", "multi_process"):
            from bagel_serve.pipeline.workers import ProcessOrchestrator

            self.orchestrator = ProcessOrchestrator(self.runner, self.pipeline, deploy, self.options,
                                                    model_dir=loaded.model_dir)
        else:
            _bound_kv_pool(self.runner, self.pipeline, deploy)
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
        """Where the model computes (with Ray: inside the actors, where this process holds no weights)."""
        return self._device if self.options.uses_ray else self.runner.model.device

    @property
    def last_stats(self) -> RunStats | None:
        """Per-phase times and throughput of the last `generate` call."""
        return self.orchestrator.last_stats

    @property
    def stage_stats(self) -> list[RunStats]:
        """The last `generate` call's stats of each stage (one entry for a single stage)."""
        return list(self.orchestrator.stage_stats)

    def generate(self, requests: Request | dict[str, Any] | Iterable[Request | dict[str, Any]], *,
                 on_token: Callable[[int, int], None] | None = None) -> list[RequestOutput]:
        """Run requests (dicts or `Request`s) together; one output per request, in order.

        Requests are validated first: a bad one raises `RequestError` before any work. A request that fails
        while running does not take the others down: its output carries the exception in `.error` (and
        `.ok` is False). `on_token(request_index, token_id)` receives decoded tokens (answers and think plans) as they come.
        """
        if isinstance(requests, (Request, dict)):
            requests = [requests]
        reqs = [make_request(r, i) for i, r in enumerate(requests)]
        timed = self.options.log_stats or self.options.enable_diffusion_pipeline_profiler
        return self.orchestrator.generate(reqs, progress=self.progress, timed=timed, on_token=on_token)


def _bound_kv_pool(runner: Runner, pipeline: PipelineSpec, deploy: DeployConfig) -> None:
    """Every stage in this process shares one pool: on CUDA it gets what the stages' pooled
    `gpu_memory_utilization` leaves after the weights and an activation reserve (`engine.memory`), and the
    schedulers admit requests within it."""
    dev = runner.model.device
    if dev.type != "cuda":
        return
    placements = [StagePlacement(dev, deploy.stage(s.stage_id).gpu_memory_utilization, False) for s in pipeline.stages]
    budgets = kv_block_budgets(placements, weights_bytes=weights_bytes(runner.model, runner.vae),
                               block_bytes=runner.pool.bytes_per_block, one_process=True)
    runner.pool.max_blocks = sum(b for b in budgets if b is not None)


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
