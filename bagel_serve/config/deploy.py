"""The deploy config schema (YAML): pipeline, stages, devices, batch limits, parallel layout, connectors and
default sampling parameters, with vllm-omni's key names so its files keep working (`docs/deploy-config.md`).

Every key is declared here with its type and range (checked by `config.validate`); an unknown key or a bad
value is a `DeployConfigError` naming its YAML path. Every declared key either drives the engine or, where
the feature does not exist here, is refused by name by `DeployConfig.require_runnable()` (the file still
loads and validates, so a vllm-omni file says everything it needs at once).

Reading files, `base_config` and overrides: `config.deploy_loader`. The pipeline registry (topologies, the
default config of a model): `config.pipelines`. A stage's parallel layout (`parallel_config`, its rank count
and rules): `config.parallel`; a stage's `devices` must name one device per rank.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import typing
from dataclasses import dataclass
from typing import Any

from bagel_serve.config.dtypes import DTYPES, VAE_PRECISIONS
from bagel_serve.config.parallel import CFG_PARALLEL_SIZES, FLAT_PARALLEL_KEYS, ParallelConfig, plural
from bagel_serve.config.quantization import (FP8_ATTENTION_NEEDS_FP8, FP8_UND_NEEDS_FP8, QUANTIZATIONS,
                                             QuantizationConfig)
from bagel_serve.config.sampling import SamplingParams
from bagel_serve.config.validate import ValidationError, build, check_field, opt

DEFAULT_DENOISE_GRAPH_SIZES = ((512, 512),)
"""At 512x512 an eager denoising step is host-bound on an H200 (the host launches it slower than the device
runs it); from 768x768 up the device's work hides the host's, and a graph gains nothing."""

__all__ = [
    "DEFAULT_DENOISE_GRAPH_SIZES",
    "DeployConfigError",
    "ParallelConfig",
    "StageConfig",
    "ConnectorConfig",
    "DeployConfig",
    "SUPPORTED_CONNECTORS",
    "DISTRIBUTED_EXECUTOR_BACKENDS",
    "CFG_PARALLEL_SIZES",
    "FLAT_PARALLEL_KEYS",
]

log = logging.getLogger(__name__)


class DeployConfigError(ValueError):
    """A deploy config is malformed, invalid, or does not fit its pipeline."""


SUPPORTED_CONNECTORS = ("SharedMemoryConnector",)
"""Connectors a stage may bind: the hand-off the worker backends implement (in place / CUDA IPC between
processes, by reference inline, the object store with Ray)."""
DISTRIBUTED_EXECUTOR_BACKENDS = ("mp", "ray")

_EDGE_RE = re.compile(r"^(from|to)_stage_(\d+)$")


# ---------------------------------------------------------------------------------------------------------
# Stages.

_TILING_NOTED: set[int] = set()
"""The vae_patch_parallel_size values whose "enabling tiling" note was logged (once each per process)."""


@dataclass(frozen=True)
class StageConfig:
    """One stage of a pipeline (vllm-omni `StageDeployConfig`)."""

    stage_id: int = opt(ge=0)
    devices: str = "0"
    """One device index per rank of the stage (`parallel_config.num_ranks`), as a comma list."""
    num_replicas: int = opt(1, ge=1)
    max_num_seqs: int = opt(1, ge=1)
    max_num_batched_tokens: int = opt(32768, ge=1)
    max_model_len: int | None = opt(None, ge=1)
    gpu_memory_utilization: float | None = opt(None, gt=0.0, le=1.0)
    kv_cache_blocks: int | None = opt(None, ge=1)
    """KV cache size in blocks of 16 tokens; null: sized from gpu_memory_utilization on CUDA, a fixed default
    on the CPU."""
    enforce_eager: bool = False
    quantization: str | None = opt(None, choices=QUANTIZATIONS)
    """As the pipeline-wide key (which it overrides); the stages share one copy of the weights, so every
    stage must end up with the same value."""
    fp8_und: bool | None = None
    """As the pipeline-wide key (which it overrides): FP8 for the understanding expert too."""
    fp8_attention: bool | None = None
    """As the pipeline-wide key (which it overrides): FP8 attention in the denoising steps of large images."""
    trust_remote_code: bool | None = None
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    vae_use_tiling: bool = False
    """Tiled VAE encode/decode; `vae_patch_parallel_size` above 1 turns it on (`vae_tiling_enabled`)."""
    vae_precision: str = opt("float32", choices=VAE_PRECISIONS)
    """The VAE's convolutions (`config.dtypes.VAE_PRECISIONS`): the reference's float32, or TF32 on a GPU."""
    denoise_graph_sizes: list[tuple[int, int]] | None = None
    """Image sizes [height, width] whose denoising steps this stage replays as CUDA graphs, captured at start
    (`engine.denoise_graphs`; not with `enforce_eager`, nor on a stage of several ranks); [] for none; null:
    `DEFAULT_DENOISE_GRAPH_SIZES`, those the model generates."""
    parallel_config: ParallelConfig = opt(factory=ParallelConfig)
    default_sampling_params: dict[str, Any] = opt(factory=dict)
    env: dict[str, str] = opt(factory=dict)
    input_connectors: dict[str, str] = opt(factory=dict)
    output_connectors: dict[str, str] = opt(factory=dict)

    @property
    def device_ids(self) -> list[int]:
        return [int(d) for d in self.devices.split(",")]

    @property
    def sampling_params(self) -> SamplingParams:
        """`default_sampling_params`, typed (validated when the file loaded)."""
        return build(SamplingParams, self.default_sampling_params, "default_sampling_params")

    # Flat views of the parallel layout (the YAML may give them flat or nested).
    @property
    def tensor_parallel_size(self) -> int:
        return self.parallel_config.tensor_parallel_size

    @property
    def cfg_parallel_size(self) -> int:
        return self.parallel_config.cfg_parallel_size

    @property
    def vae_patch_parallel_size(self) -> int:
        return self.parallel_config.vae_patch_parallel_size

    @property
    def use_hsdp(self) -> bool:
        return self.parallel_config.use_hsdp

    @property
    def num_ranks(self) -> int:
        """The rank processes one replica of this stage runs (`ParallelConfig.num_ranks`)."""
        return self.parallel_config.num_ranks

    @property
    def vae_tiling_enabled(self) -> bool:
        """Whether the VAE runs tiled: `vae_use_tiling`, or VAE patch parallel (its tiles are the unit of work
        spread over the ranks, so it needs tiling and turns it on, saying so once, as the seed does)."""
        if self.vae_use_tiling:
            return True
        size = self.vae_patch_parallel_size
        if size > 1:
            if size not in _TILING_NOTED:
                _TILING_NOTED.add(size)
                log.info("vae_patch_parallel_size=%d requires vae_use_tiling; enabling it", size)
            return True
        return False

    @classmethod
    def _extra_keys(cls) -> tuple[str, ...]:
        return FLAT_PARALLEL_KEYS

    @classmethod
    def _preprocess(cls, data: dict[str, Any], path: str) -> dict[str, Any]:
        data = dict(data)
        p = f"{path}." if path else ""
        # devices: accept 0, "0, 1", [0, 1]; normalise to "0,1".
        if "devices" in data:
            data["devices"] = _normalise_devices(data["devices"], f"{p}devices")
        # env: scalar values become strings (YAML reads `OMP_NUM_THREADS: 4` as an int).
        env = data.get("env")
        if isinstance(env, dict):
            data["env"] = {k: (str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                           for k, v in env.items()}
        # Flat parallel keys fold into parallel_config.
        flat = {k: data.pop(k) for k in FLAT_PARALLEL_KEYS if k in data}
        if flat:
            pc = data.get("parallel_config")
            if pc is None:
                pc = {}
            if not isinstance(pc, dict):
                return data  # the validator reports parallel_config's type
            pc = dict(pc)
            pc_fields = {f.name: f for f in dataclasses.fields(ParallelConfig)}
            hints = typing.get_type_hints(ParallelConfig)
            for key, raw in flat.items():
                value = check_field(pc_fields[key], hints[key], raw, f"{p}{key}")
                if key in pc:
                    nested = check_field(pc_fields[key], hints[key], pc[key], f"{p}parallel_config.{key}")
                    if nested != value:
                        raise ValidationError(f"{p}{key}",
                                              f"{value!r} conflicts with parallel_config.{key}: {nested!r}")
                pc[key] = raw
            data["parallel_config"] = pc
        return data

    def _check(self, path: str) -> None:
        p = f"{path}." if path else ""
        ids = self.device_ids
        dup = next((d for i, d in enumerate(ids) if d in ids[:i]), None)
        if dup is not None:
            raise ValidationError(f"{p}devices", f"{self.devices!r} names device {dup} twice: each rank needs a "
                                                 f"device of its own")
        ranks = self.parallel_config.num_ranks
        # A layout with a feature that is not built is refused by name at start (`unsupported`); counting
        # its devices first would ask for a fix that cannot make it run.
        if len(ids) != ranks and not self.parallel_config.unsupported(path):
            want = ",".join(str(ids[0] + k) for k in range(ranks))
            default = " (a stage without devices gets \"0\")" if self.devices == "0" else ""
            raise ValidationError(f"{p}devices",
                                  f"{self.devices!r} names {plural(len(ids), 'device')} but "
                                  f"{self.parallel_config.describe_ranks()}: list one device per rank, e.g. "
                                  f"devices: \"{want}\"{default}")
        params = build(SamplingParams, self.default_sampling_params, f"{p}default_sampling_params")
        if params.detokenize is False:
            raise ValidationError(f"{p}default_sampling_params.detokenize",
                                  "false cannot be honoured: outputs are always detokenized (leave it out or true)")
        for attr, direction in (("input_connectors", "from"), ("output_connectors", "to")):
            for edge in getattr(self, attr):
                m = _EDGE_RE.match(edge)
                if not m or m.group(1) != direction:
                    raise ValidationError(f"{p}{attr}.{edge}",
                                          f"edge names must look like '{direction}_stage_<id>'")

    def unsupported(self, where: str) -> list[str]:
        """One line per key of this stage the engine cannot honour."""
        out = self.parallel_config.unsupported(where)
        if self.num_replicas > 1:
            out.append(f"stage replicas ({where}.num_replicas={self.num_replicas}) are not built yet")
        if self.enable_chunked_prefill is False:
            out.append(f"{where}.enable_chunked_prefill=false cannot be honoured: prefill is always chunked at "
                       f"max_num_batched_tokens (leave it out or true)")
        if self.stage_id != 0 and self.default_sampling_params:
            keys = ", ".join(sorted(self.default_sampling_params))
            out.append(f"{where}.default_sampling_params ({keys}) cannot be honoured: requests take their defaults "
                       f"from stage 0, the stage that decodes text and seeds the noise; set them there")
        return out


@dataclass(frozen=True)
class ConnectorConfig:
    """A named transport for stage hand-offs (e.g. SharedMemoryConnector)."""

    name: str = opt()
    extra: dict[str, Any] = opt(factory=dict)


# ---------------------------------------------------------------------------------------------------------
# The whole file.


@dataclass(frozen=True)
class DeployConfig:
    """A whole deploy config: the pipeline, its stages and the pipeline-wide knobs."""

    stages: list[StageConfig] = opt()
    pipeline: str | None = None
    async_chunk: bool = False
    base_config: str | None = None
    connectors: dict[str, ConnectorConfig] = opt(factory=dict)
    edges: list[dict[str, Any]] | None = None
    platforms: dict[str, dict[str, Any]] | None = None
    session_mode: str | None = None
    trust_remote_code: bool | None = None
    dtype: str | None = opt(None, choices=tuple(DTYPES))
    quantization: str | None = opt(None, choices=QUANTIZATIONS)
    """`fp8`: the generation expert's projections in FP8 (W8A8 e4m3, `config.quantization`)."""
    fp8_und: bool | None = None
    """With `quantization: fp8`, the understanding expert's projections too (off by default)."""
    fp8_attention: bool | None = None
    """With `quantization: fp8`, the attention of denoising steps of large images (at least 2,048 image
    queries) in FP8 through cuDNN (off by default: it changes images more than FP8 projections alone)."""
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    distributed_executor_backend: str | None = None
    data_parallel_size: int | None = opt(None, ge=1)
    pipeline_parallel_size: int | None = opt(None, ge=1)
    # Not YAML keys: where the config came from and the merged mapping it was built from.
    source: str | None = opt(None, internal=True)
    raw: dict[str, Any] = opt(factory=dict, internal=True)

    @property
    def single_stage(self) -> bool:
        return len(self.stages) == 1

    def stage(self, stage_id: int) -> StageConfig:
        for s in self.stages:
            if s.stage_id == stage_id:
                return s
        raise KeyError(stage_id)

    def prefix_caching_enabled(self, stage_id: int) -> bool:
        """Whether a stage caches prompt prefixes: its `enable_prefix_caching`, or the pipeline-wide key
        when the stage leaves it null; off when both are null."""
        value = self.stage(stage_id).enable_prefix_caching
        return bool(self.enable_prefix_caching if value is None else value)

    def _stage_quantization(self, s: StageConfig) -> tuple[str | None, bool, bool]:
        """(quantization, fp8_und, fp8_attention) of one stage: its own keys, else the pipeline-wide ones."""
        method = s.quantization if s.quantization is not None else self.quantization
        und = s.fp8_und if s.fp8_und is not None else self.fp8_und
        attention = s.fp8_attention if s.fp8_attention is not None else self.fp8_attention
        return method, bool(und), bool(attention)

    def _quantization_conflict(self) -> str | None:
        per_stage = [self._stage_quantization(s) for s in self.stages]
        if len(set(per_stage)) <= 1:
            return None
        shown = ", ".join(f"stages[{i}]: quantization={m!r}, fp8_und={u}, fp8_attention={a}"
                          for i, (m, u, a) in enumerate(per_stage))
        return (f"per-stage quantization ({shown}) cannot be honoured: the stages share one copy of the weights; "
                f"set quantization (and fp8_und, fp8_attention) pipeline-wide or the same in every stage")

    def quantization_config(self) -> QuantizationConfig | None:
        """What the model loader quantises (None: nothing); the same for every stage (`require_runnable`
        refuses stages that differ)."""
        conflict = self._quantization_conflict()
        if conflict is not None:
            raise DeployConfigError(conflict)
        method, und, attention = self._stage_quantization(self.stages[0])
        return QuantizationConfig(method, fp8_und=und, fp8_attention=attention) if method is not None else None

    def require_runnable(self) -> None:
        """Raise NotImplementedError naming every key of this config the engine cannot honour.

        Whether the stages can be placed (worker backend) is the engine options' question, and whether the
        stage graph fits the pipeline is `pipelines.resolve_pipeline`'s."""
        missing: list[str] = []
        for i, s in enumerate(self.stages):
            missing += s.unsupported(f"stages[{i}]")
            for attr in ("input_connectors", "output_connectors"):
                for edge, conn in getattr(s, attr).items():
                    c = self.connectors[conn]
                    where = f"stages[{i}].{attr}.{edge}"
                    if c.name not in SUPPORTED_CONNECTORS:
                        missing.append(f"connector {conn!r} ({c.name}, bound at {where}) is not built: stage hand-offs "
                                       f"go through {', '.join(SUPPORTED_CONNECTORS)} (bind that, or leave the "
                                       f"connector unbound)")
                    elif c.extra:
                        missing.append(f"connectors.{conn}.extra ({', '.join(sorted(c.extra))}) cannot be honoured: "
                                       f"{c.name} takes no settings here")
        for key in ("data_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, key)
            if value is not None and value > 1:
                label = key.replace("_size", "").replace("_", " ")
                missing.append(f"{label} ({key}={value}) is not built yet")
        conflict = self._quantization_conflict()
        if conflict is not None:
            missing.append(conflict)
        if self.enable_chunked_prefill is False:
            missing.append("enable_chunked_prefill=false cannot be honoured: prefill is always chunked at "
                           "max_num_batched_tokens (leave it out or true)")
        if self.platforms is not None:
            missing.append(f"platforms ({', '.join(sorted(self.platforms)) or 'empty'}) cannot be honoured: "
                           f"bagel-serve applies no per-platform overlays; write the settings into the stages")
        if self.session_mode is not None:
            missing.append(f"session_mode={self.session_mode!r} is not supported by bagel-serve")
        backend = self.distributed_executor_backend
        if backend is not None and backend not in DISTRIBUTED_EXECUTOR_BACKENDS:
            missing.append(f"distributed_executor_backend={backend!r} is not supported (one of "
                           f"{', '.join(DISTRIBUTED_EXECUTOR_BACKENDS)}, or leave it out)")
        if missing:
            src = f"{self.source}: " if self.source else ""
            raise NotImplementedError(f"{src}deploy config cannot run here: " + "; ".join(missing))

    def _check(self, path: str) -> None:
        if not self.stages:
            raise ValidationError("stages", "at least one stage is required")
        for i, s in enumerate(self.stages):
            method, und, attention = self._stage_quantization(s)
            if und and method is None:
                where = f"stages[{i}].fp8_und" if s.fp8_und else "fp8_und"
                raise ValidationError(where, f"true needs quantization: fp8 — {FP8_UND_NEEDS_FP8}")
            if attention and method is None:
                where = f"stages[{i}].fp8_attention" if s.fp8_attention else "fp8_attention"
                raise ValidationError(where, f"true needs quantization: fp8 — {FP8_ATTENTION_NEEDS_FP8}")
        seen: dict[int, int] = {}
        for i, s in enumerate(self.stages):
            if s.stage_id in seen:
                raise ValidationError(f"stages[{i}].stage_id",
                                      f"duplicate stage id {s.stage_id} (also stages[{seen[s.stage_id]}])")
            seen[s.stage_id] = i
        ids = sorted(seen)
        if ids != list(range(len(ids))):
            raise ValidationError("stages", f"stage ids must be 0..{len(ids) - 1}, got {ids}")
        for i, s in enumerate(self.stages):
            for attr in ("input_connectors", "output_connectors"):
                for edge, conn in getattr(s, attr).items():
                    where = f"stages[{i}].{attr}.{edge}"
                    other = int(_EDGE_RE.match(edge).group(2))
                    if other not in seen or other == s.stage_id:
                        raise ValidationError(where, f"no other stage with id {other}")
                    if conn not in self.connectors:
                        known = ", ".join(sorted(self.connectors)) or "none defined"
                        raise ValidationError(where, f"connector {conn!r} is not defined in connectors "
                                                     f"(defined: {known})")
        for i, edge in enumerate(self.edges or []):
            for key in edge:
                if key not in ("from", "to"):
                    raise ValidationError(f"edges[{i}].{key}", "unknown key (known: from, to)")
            for key in ("from", "to"):
                if key not in edge:
                    raise ValidationError(f"edges[{i}]", f"missing '{key}'")
                if isinstance(edge[key], bool) or not isinstance(edge[key], int):
                    raise ValidationError(f"edges[{i}].{key}", f"must be a stage id, got {edge[key]!r}")
                if edge[key] not in seen:
                    raise ValidationError(f"edges[{i}].{key}", f"no stage with id {edge[key]}")


def _normalise_devices(value: Any, path: str) -> Any:
    if isinstance(value, bool):
        return value  # the validator reports it
    if isinstance(value, int):
        parts = [value]
    elif isinstance(value, list):
        parts = value
    elif isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    else:
        return value
    out = []
    for part in parts:
        if isinstance(part, bool) or not (isinstance(part, int) or (isinstance(part, str) and part.isdigit())):
            raise ValidationError(path, f"must be a device index or a comma list of them (like \"0,1\"), got {value!r}")
        if int(part) < 0:
            raise ValidationError(path, f"device indices must be >= 0, got {value!r}")
        out.append(str(int(part)))
    if not out:
        raise ValidationError(path, "no devices given")
    return ",".join(out)
