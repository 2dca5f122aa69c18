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
from bagel_serve.engine.preprocess import prepare
from bagel_serve.engine.request import Request, RequestOutput, make_request
from bagel_serve.engine.stage_engine import Stage
from bagel_serve.engine.stats import RunStats
from bagel_serve.engine.tokenizer import BagelTokenizer
from bagel_serve.model.loader import default_device, default_dtype, load_model, load_skeleton, read_config, resolve_model_dir
from bagel_serve.pipeline.backends.inline import InlineTransport
from bagel_serve.pipeline.backends.process import ProcessTransport
from bagel_serve.pipeline.backends.ray import RayTransport
from bagel_serve.pipeline.orchestrator import Orchestrator
from bagel_serve.pipeline.placement import stage_devices, stage_setups
from bagel_serve.testing.demo import DEMO_MODEL, ensure_demo_model


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
        model_dir = ensure_demo_model() if str(model) == DEMO_MODEL else resolve_model_dir(model)
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
        self.model = loaded.model
        self.tokenizer = BagelTokenizer(loaded.model_dir)
        self.progress = progress
        backend = "ray" if self.options.uses_ray else (
            "process" if self.pipeline.num_stages > 1 and self.options.worker_backend in ("process", "multi_process")
            else "inline")
        device = self._device if self.options.uses_ray else loaded.model.device
        setups = stage_setups(self.pipeline, deploy, self.options, device, backend=backend)
        max_model_len = deploy.stage(0).max_model_len or loaded.config.llm.max_position_embeddings
        cfg, tok = loaded.config, self.tokenizer
        if backend == "ray":
            where = str(model_dir.resolve()) if Path(model).expanduser().is_dir() else str(model)
            transport = RayTransport(setups, stage_devices(device, deploy, self.pipeline.num_stages), model=where,
                                     dtype=loaded.model.dtype, ray_address=self.options.ray_address,
                                     init_timeout=self.options.init_timeout)
        elif backend == "process":
            transport = ProcessTransport(setups, loaded.model, loaded.vae, str(loaded.model_dir))
        else:
            transport = InlineTransport(setups, loaded.model, loaded.vae, tok, progress=progress)
        self.orchestrator = Orchestrator(
            self.pipeline, lambda i, r: prepare(i, r, cfg, tok, max_model_len), transport,
            init_timeout=min(self.options.init_timeout, self.options.stage_init_timeout),
            request_timeout=self.options.request_timeout)

    @property
    def stage(self) -> Stage:
        """Stage 0 when the stages run in this process (`worker_backend="inline"` or a single stage)."""
        stages = getattr(self.orchestrator.transport, "stages", None)
        if not stages:
            raise AttributeError("the stages run in worker processes or Ray actors: there is no stage in this process")
        return stages[0]

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
        return self._device if self.options.uses_ray else self.model.device

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
