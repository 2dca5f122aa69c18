"""The Python API: `Omni(model, ...).generate(requests)`; the CLI and the server are built on it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import torch

from bagel_serve.config.deploy import DeployConfig, DeployConfigError
from bagel_serve.config.deploy_loader import apply_overrides, load_deploy_config, resolve_deploy_path
from bagel_serve.config.devices import check_device, check_stage_devices
from bagel_serve.config.engine_options import EngineOptionError, EngineOptions, parse_dtype
from bagel_serve.config.parallel_checks import check_graph_sizes_against_model, check_parallel_against_model
from bagel_serve.config.pipelines import PipelineSpec, default_deploy_config, resolve_pipeline
from bagel_serve.engine.preprocess import prepare
from bagel_serve.engine.request import Request, RequestOutput, make_request, request_defaults
from bagel_serve.engine.stage_engine import Stage
from bagel_serve.engine.stats import RunStats
from bagel_serve.engine.tokenizer import BagelTokenizer
from bagel_serve.model.loader import default_dtype, load_model, load_skeleton, read_config, resolve_model_dir
from bagel_serve.pipeline.backends.inline import InlineTransport
from bagel_serve.pipeline.backends.process import ProcessTransport
from bagel_serve.pipeline.backends.ray import RayTransport
from bagel_serve.pipeline.async_stream import AsyncStream
from bagel_serve.pipeline.orchestrator import Orchestrator, collect_outputs
from bagel_serve.pipeline.submission import Sink, Submission
from bagel_serve.pipeline.placement import WeightSource, stage_devices, stage_setups
from bagel_serve.testing.demo import DEMO_MODEL, ensure_demo_model


class Omni:
    """One loaded BAGEL model serving all four modalities.

    `model` is a checkpoint directory or a Hugging Face repo id. Weights are bf16 on CUDA and float32 on
    the CPU unless `dtype` (or the deploy config's `dtype`) says otherwise. `deploy_config` is a deploy YAML
    in the seed system's schema, a path or the bare name of a bundled one (`"bagel_single_stage.yaml"`);
    default: `bagel.yaml`, the two-stage Thinker -> DiT pipeline, for a BAGEL checkpoint. The other keyword
    arguments are the seed's engine options, as `bagel_serve.config.engine_options.EngineOptions` declares
    them (parallel layout, worker backend, timeouts, reporting, `stage_overrides`, and limits applied to
    every stage such as `max_num_seqs`). `quantization="fp8"` runs the generation expert's projections in
    FP8 (W8A8 e4m3; `fp8_und=True` adds the understanding expert's; `fp8_attention=True` runs the attention of
    denoising steps of large images in FP8 too). An option whose feature is not built yet fails by name rather
    than being ignored.

    Everything that can be checked without the weights (options, device, checkpoint config, tokenizer,
    deploy config, its parallel layout against the model's heads, the GPUs it names) is checked before they
    load (`docs/parallelism.md`).
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
        self._device = check_device(device)
        model_dir = ensure_demo_model() if str(model) == DEMO_MODEL else resolve_model_dir(model)
        # A broken checkpoint config is reported as such, before the deploy config; pipeline detection reads
        # the config.json it parsed (None: the checkpoint has none).
        model_cfg = read_config(model_dir)
        config_json = model_cfg.raw if (model_dir / "config.json").is_file() else None
        plan = resolve_deploy(deploy_config, self.options, config_json)
        deploy = plan.config
        self.deploy_path = plan.path
        self.pipeline: PipelineSpec = plan.pipeline
        self.options.require_runnable(self.pipeline.num_stages)
        deploy.require_runnable()
        check_parallel_against_model(deploy, model_cfg.llm)
        check_graph_sizes_against_model(deploy, model_cfg)
        if not self.options.uses_ray:  # Ray places the stages on its own cluster's GPUs
            check_stage_devices(deploy, self._device)
        self.deploy_config: DeployConfig = deploy
        self.request_defaults: dict[str, Any] = plan.request_defaults
        """Stage 0's `default_sampling_params` as request defaults (a request's own values win)."""
        if dtype is None and deploy.dtype is not None:
            dtype = deploy.dtype
        if isinstance(dtype, str):
            dtype = parse_dtype(dtype)
        backend = self.options.worker_backend
        ranks = [deploy.stage(s).parallel_config.num_ranks for s in range(self.pipeline.num_stages)]
        if max(ranks) > 1 and (self.options.uses_ray or backend == "inline"):
            raise EngineOptionError(
                f"worker_backend={'ray' if self.options.uses_ray else backend}: a stage of several ranks "
                f"(tensor/CFG parallelism or HSDP; ranks per stage {ranks}) runs one worker process per rank on "
                f"this host; use worker_backend process (the default)")
        in_process = not self.options.uses_ray and max(ranks) == 1 and (self.pipeline.single_stage or backend == "inline")
        if in_process:
            _apply_env(deploy, self.pipeline)
        self.tokenizer = BagelTokenizer(model_dir)  # a broken tokenizer.json fails before the weights load
        if self.options.uses_ray or min(ranks) > 1:
            # The actors (the ranks) load the weights where they run; here a skeleton validates the requests.
            loaded = load_skeleton(model_dir, dtype=dtype or default_dtype(self._device))
        else:
            loaded = load_model(model_dir, device=self._device, dtype=dtype, progress=progress,
                                quantization=deploy.quantization_config())
        self.config = loaded.config
        self.model_dir = loaded.model_dir
        self.model = loaded.model
        self.progress = progress
        self._backend = "ray" if self.options.uses_ray else ("inline" if in_process else "process")
        device = self._device if self.options.uses_ray or min(ranks) > 1 else loaded.model.device
        weights = WeightSource(str(model_dir), dtype or default_dtype(self._device), deploy.quantization_config())
        setups = stage_setups(self.pipeline, deploy, self.options, device, backend=self._backend, weights=weights)
        max_model_len = deploy.stage(0).max_model_len or loaded.config.llm.max_position_embeddings
        cfg, tok = loaded.config, self.tokenizer
        if self._backend == "ray":
            where = str(model_dir.resolve()) if Path(model).expanduser().is_dir() else str(model)
            transport = RayTransport(setups, stage_devices(device, deploy, self.pipeline.num_stages), model=where,
                                     dtype=loaded.model.dtype, quantization=deploy.quantization_config(),
                                     ray_address=self.options.ray_address,
                                     init_timeout=self.options.init_timeout)
        elif self._backend == "process":
            transport = ProcessTransport(setups, loaded.model, loaded.vae, str(loaded.model_dir))
        else:
            transport = InlineTransport(setups, loaded.model, loaded.vae, tok, progress=progress)
        self.orchestrator = Orchestrator(
            self.pipeline, lambda i, r: prepare(i, r, cfg, tok, max_model_len), transport,
            init_timeout=min(self.options.init_timeout, self.options.stage_init_timeout),
            request_timeout=self.options.request_timeout, max_queue=self.options.max_queue)

    @property
    def stage(self) -> Stage:
        """Stage 0 when the stages run in this process (`worker_backend="inline"` or a single stage)."""
        stages = getattr(self.orchestrator.transport, "stages", None)
        if not stages:
            raise AttributeError("the stages run in worker processes or Ray actors: there is no stage in this process")
        return stages[0]

    @property
    def topology(self) -> dict[str, Any]:
        """Which topology runs: the pipeline, its stages, where they run (`inline`: in this process,
        `process`: one process per stage, `ray`: one Ray actor per stage) and the deploy config."""
        return {"pipeline": self.pipeline.name, "num_stages": self.pipeline.num_stages,
                "stages": [r.name for r in self.pipeline.stages], "worker_backend": self._backend,
                "deploy_config": str(self.deploy_path)}

    def make_requests(self, requests: Request | dict[str, Any] | Iterable[Request | dict[str, Any]]) -> list[Request]:
        """Requests as `generate` runs them: validated, with every default resolved (request > stage 0's
        `default_sampling_params` > built-in). Raises `RequestError`; warns (`RequestWarning`) about fields
        a request's modality does not use."""
        if isinstance(requests, (Request, dict)):
            requests = [requests]
        return [make_request(r, i, self.request_defaults) for i, r in enumerate(requests)]

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

        Requests are validated first (`make_requests`): a bad one raises `RequestError` before any work. A request that fails
        while running does not take the others down: its output carries the exception in `.error` (and
        `.ok` is False). `on_token(request_index, token_id)` receives decoded tokens (answers and think plans) as they come.
        """
        reqs = self.make_requests(requests)
        return self.orchestrator.generate(reqs, progress=self.progress, timed=self._timed, on_token=on_token)

    @property
    def _timed(self) -> bool:
        return self.options.log_stats or self.options.enable_diffusion_pipeline_profiler

    def submit(self, requests: Request | dict[str, Any] | Iterable[Request | dict[str, Any]], sink: Sink, *,
               stream: bool = False, progress: bool = False, timeout: float | None = None) -> Submission:
        """Queue requests and return at once: the engine's loop calls `sink(Event)` as tokens, denoising
        steps, outputs and errors come (`bagel_serve.pipeline.submission`). Raises `RequestError` for a bad
        request, `QueueFullError` when `max_queue` requests are unfinished."""
        return self.orchestrator.submit(self.make_requests(requests), sink, timed=self._timed, stream=stream,
                                        progress=progress, timeout=timeout)

    def stream(self, requests: Request | dict[str, Any] | Iterable[Request | dict[str, Any]], *,
               progress: bool = True, timeout: float | None = None, tokens: bool = True) -> AsyncStream:
        """The async API, streaming: `async with omni.stream(req) as s: async for ev in s: ...` yields token
        (with `tokens`), progress, output and error events (`Event.kind`) as they come; leaving the block
        early cancels what is pending. Call it inside a running event loop."""
        reqs = self.make_requests(requests)
        return AsyncStream(lambda sink: self.orchestrator.submit(reqs, sink, timed=self._timed, stream=tokens,
                                                                 progress=progress, timeout=timeout))

    async def agenerate(self, requests: Request | dict[str, Any] | Iterable[Request | dict[str, Any]], *,
                        timeout: float | None = None) -> list[RequestOutput]:
        """`generate` for asyncio callers: runs beside everything else the engine runs, never blocks the event
        loop; a cancelled task cancels its requests. One output per request, in order (a failed one carries
        `.error`); raises `WorkerDiedError` if the engine fails."""
        reqs = self.make_requests(requests)
        outputs: dict[int, RequestOutput] = {}
        errors: dict[int, BaseException] = {}
        async with AsyncStream(lambda sink: self.orchestrator.submit(reqs, sink, timed=self._timed,
                                                                     timeout=timeout)) as events:
            async for ev in events:
                if ev.kind == "fatal":
                    raise ev.data
                if ev.kind == "output":
                    outputs[ev.index] = ev.data
                elif ev.kind == "error":
                    errors[ev.index] = ev.data
        return collect_outputs(reqs, outputs, errors)


class DeployPlan(NamedTuple):
    """A deploy config as a run uses it."""

    path: Path
    config: DeployConfig
    """Validated, with the engine options' overrides applied."""
    request_defaults: dict[str, Any]
    """Stage 0's `default_sampling_params` as request defaults (a request's own values win)."""
    pipeline: PipelineSpec
    """The pipeline it runs; its stages' roles fit the overridden config."""


def resolve_deploy(deploy_config: str | os.PathLike | None, options: EngineOptions,
                   model_config: Mapping[str, Any] | None = None, *, think: bool = False) -> DeployPlan:
    """The deploy config `deploy_config` names (None: the model's default, the think pipeline's with `think`),
    loaded, with `options`' overrides. It reads no checkpoint file (`model_config` is its config.json when the
    caller has read it; None counts as BAGEL): so the CLI can resolve its requests with their deploy defaults,
    and warn about them, before it starts an `Omni`, which resolves the same file again."""
    path = resolve_deploy_path(deploy_config if deploy_config is not None
                               else default_deploy_config(model_config, think=think))
    loaded = load_deploy_config(path)
    # The diffusion options apply to the pipeline's diffusion stages; the overrides may then have put
    # something on a stage whose role refuses it, so the pipeline is checked again on the result.
    overrides = options.deploy_overrides(resolve_pipeline(loaded, model_config).diffusion_stage_ids)
    deploy = apply_overrides(loaded, overrides, options.stage_overrides)
    pipeline = resolve_pipeline(deploy, model_config)
    return DeployPlan(path, deploy, request_defaults(deploy.stage(0).sampling_params), pipeline)


def _apply_env(deploy: DeployConfig, pipeline: PipelineSpec) -> None:
    """The `env` of the stages that run in this process, set in os.environ before the model loads (variables
    that torch reads at import, like OMP_NUM_THREADS, may already have been read)."""
    merged: dict[str, tuple[str, int]] = {}
    for role in pipeline.stages:
        for key, value in deploy.stage(role.stage_id).env.items():
            if key in merged and merged[key][0] != value:
                src = f"{deploy.source}: " if deploy.source else ""
                raise DeployConfigError(f"{src}stages[{role.stage_id}].env.{key}: {value!r} conflicts with stage "
                                        f"{merged[key][1]}'s {merged[key][0]!r}, but both stages run in this process")
            merged[key] = (value, role.stage_id)
    os.environ.update({k: v for k, (v, _) in merged.items()})
