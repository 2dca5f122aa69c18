"""Deploy configs (YAML) and the pipeline registry.

A deploy config says how a model is served: which pipeline (topology) runs it, how many stages, which
devices each stage uses, its batch limits, its parallel layout and its default sampling parameters. The
schema is the one vllm-omni users already write (`pipeline`, `stages[]` with `stage_id, devices,
max_num_seqs, max_num_batched_tokens, enforce_eager, vae_use_tiling, parallel_config{...},
default_sampling_params`, ...), so their files keep working. See `docs/deploy-config.md`.

Loading is strict: every key is declared here, an unknown key or a value of the wrong type is an error that
names its YAML path (`stages[1].parallel_config.tensor_paralel_size: unknown key (known: ...)`), prefixed
with the file.

Pipelines (`PIPELINES`):
  * `bagel`              two stages: 0 "thinker" (autoregressive: contexts, text, think) hands the context
                         KV to 1 "dit" (diffusion: denoise + VAE decode) once prefill finishes.
  * `bagel_think`        the same two stages; the think plan is decoded in stage 0 before the hand-off.
  * `bagel_single_stage` one "dit" stage that runs everything.

Today the engine runs single-stage only, so `default_deploy_config()` returns `deploy/bagel_single_stage.yaml`
for a BAGEL model, with or without think. The two-stage files (`deploy/bagel.yaml`, `deploy/bagel_think.yaml`)
run too, with the stages in their own processes or inline; they become the default once the two-stage path is
measured on GPUs. `DeployConfig.require_runnable()` says what is not built yet.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

__all__ = [
    "DeployConfigError",
    "ParallelConfig",
    "StageConfig",
    "ConnectorConfig",
    "DeployConfig",
    "StageRole",
    "PipelineSpec",
    "PIPELINES",
    "load_deploy_config",
    "parse_deploy_config",
    "apply_overrides",
    "is_bagel_model_config",
    "resolve_pipeline",
    "bundled_deploy_dir",
    "bundled_deploy_config",
    "default_deploy_config",
]


class DeployConfigError(ValueError):
    """A deploy config is malformed, invalid, or does not fit its pipeline."""


class _FieldError(Exception):
    """A validation error at a YAML path; turned into a DeployConfigError with the file prefixed."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


# ---------------------------------------------------------------------------------------------------------
# Field helpers: range metadata read by the generic validator.


def _opt(default: Any = dataclasses.MISSING, *, factory: Any = None, ge: float | None = None,
         gt: float | None = None, le: float | None = None, choices: tuple | None = None,
         internal: bool = False) -> Any:
    meta = {"ge": ge, "gt": gt, "le": le, "choices": choices, "internal": internal}
    kwargs: dict[str, Any] = {"metadata": meta}
    if factory is not None:
        kwargs["default_factory"] = factory
    elif default is not dataclasses.MISSING:
        kwargs["default"] = default
    if internal:
        kwargs.update(repr=False, compare=False)
    return field(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# Schema.


@dataclass(frozen=True)
class ParallelConfig:
    """How one stage spreads over GPUs (vllm-omni `DiffusionParallelConfig`). All neutral by default."""

    pipeline_parallel_size: int = _opt(1, ge=1)
    data_parallel_size: int = _opt(1, ge=1)
    tensor_parallel_size: int = _opt(1, ge=1)
    enable_expert_parallel: bool = False
    sequence_parallel_size: int = _opt(1, ge=1)
    ulysses_degree: int = _opt(1, ge=1)
    ring_degree: int = _opt(1, ge=1)
    allgather_degree: int = _opt(1, ge=1)
    ulysses_mode: str = _opt("strict", choices=("strict", "advanced_uaa"))
    cfg_parallel_size: int = _opt(1, choices=(1, 2, 3))
    vae_patch_parallel_size: int = _opt(1, ge=1)
    vae_parallel_mode: str = _opt("tile", choices=("tile", "spatial_shard_height", "spatial_shard_width"))
    use_hsdp: bool = False
    hsdp_shard_size: int = _opt(-1, ge=-1)  # -1 = auto
    hsdp_replicate_size: int = _opt(1, ge=1)

    @property
    def derived_sequence_parallel_size(self) -> int:
        """SP size implied by the degrees: allgather_degree if > 1, else ulysses_degree * ring_degree."""
        return self.allgather_degree if self.allgather_degree > 1 else self.ulysses_degree * self.ring_degree

    @property
    def effective_sequence_parallel_size(self) -> int:
        return max(self.sequence_parallel_size, self.derived_sequence_parallel_size)

    @property
    def world_size(self) -> int:
        """GPUs one replica of the stage uses: PP * DP * TP * SP * CFG."""
        return (self.pipeline_parallel_size * self.data_parallel_size * self.tensor_parallel_size
                * self.effective_sequence_parallel_size * self.cfg_parallel_size)

    @property
    def is_neutral(self) -> bool:
        """True when nothing is parallel (what the engine runs today)."""
        return (self.world_size == 1 and self.vae_patch_parallel_size == 1 and not self.use_hsdp
                and not self.enable_expert_parallel)

    def _check(self, path: str) -> None:
        p = f"{path}." if path else ""
        if self.allgather_degree > 1 and (self.ulysses_degree > 1 or self.ring_degree > 1):
            raise _FieldError(f"{p}allgather_degree",
                              "AllGather-KV is exclusive with Ulysses/Ring (ulysses_degree and ring_degree must be 1)")
        derived = self.derived_sequence_parallel_size
        if self.sequence_parallel_size > 1 and derived > 1 and self.sequence_parallel_size != derived:
            raise _FieldError(f"{p}sequence_parallel_size",
                              f"{self.sequence_parallel_size} does not match the degrees (allgather_degree if > 1, "
                              f"else ulysses_degree * ring_degree = {derived})")
        if self.hsdp_shard_size == 0:
            raise _FieldError(f"{p}hsdp_shard_size", "must be -1 (auto) or >= 1, got 0")
        if self.use_hsdp:
            if self.tensor_parallel_size > 1 or self.data_parallel_size > 1:
                raise _FieldError(f"{p}use_hsdp", "HSDP cannot be combined with tensor or data parallelism")
            world = self.world_size
            if world == 1 and self.hsdp_shard_size == -1:
                raise _FieldError(f"{p}hsdp_shard_size",
                                  "standalone HSDP (no other parallelism) needs an explicit hsdp_shard_size")
            if world > 1 and self.hsdp_shard_size != -1 and self.hsdp_shard_size * self.hsdp_replicate_size != world:
                raise _FieldError(f"{p}hsdp_shard_size",
                                  f"hsdp_replicate_size * hsdp_shard_size = "
                                  f"{self.hsdp_replicate_size * self.hsdp_shard_size} must equal the world size {world}")


# Diffusion parallel keys that may also be written flat in a stage; they are folded into parallel_config.
FLAT_PARALLEL_KEYS: tuple[str, ...] = (
    "tensor_parallel_size", "cfg_parallel_size", "vae_patch_parallel_size", "vae_parallel_mode",
    "use_hsdp", "hsdp_shard_size", "hsdp_replicate_size",
    "sequence_parallel_size", "ulysses_degree", "ring_degree", "allgather_degree",
)

# Common sampling keys whose type we check; other keys in default_sampling_params pass through unchecked.
_SAMPLING_TYPES: dict[str, type] = {
    "temperature": float, "top_p": float, "top_k": int, "min_p": float, "max_tokens": int, "min_tokens": int,
    "seed": int, "detokenize": bool, "repetition_penalty": float, "presence_penalty": float,
    "frequency_penalty": float, "n": int, "num_inference_steps": int, "guidance_scale": float,
}

_EDGE_RE = re.compile(r"^(from|to)_stage_(\d+)$")


@dataclass(frozen=True)
class StageConfig:
    """One stage of a pipeline (vllm-omni `StageDeployConfig`)."""

    stage_id: int = _opt(ge=0)
    devices: str = "0"
    num_replicas: int = _opt(1, ge=1)
    max_num_seqs: int = _opt(1, ge=1)
    max_num_batched_tokens: int = _opt(32768, ge=1)
    max_model_len: int | None = _opt(None, ge=1)
    gpu_memory_utilization: float | None = _opt(None, gt=0.0, le=1.0)
    kv_cache_blocks: int | None = _opt(None, ge=2)
    enforce_eager: bool = False
    trust_remote_code: bool | None = None
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    vae_use_tiling: bool = False
    parallel_config: ParallelConfig = _opt(factory=ParallelConfig)
    default_sampling_params: dict[str, Any] = _opt(factory=dict)
    env: dict[str, str] = _opt(factory=dict)
    input_connectors: dict[str, str] = _opt(factory=dict)
    output_connectors: dict[str, str] = _opt(factory=dict)

    @property
    def device_ids(self) -> list[int]:
        return [int(d) for d in self.devices.split(",")]

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
                value = _convert_field(pc_fields[key], hints[key], raw, f"{p}{key}")
                if key in pc:
                    nested = _convert_field(pc_fields[key], hints[key], pc[key], f"{p}parallel_config.{key}")
                    if nested != value:
                        raise _FieldError(f"{p}{key}",
                                          f"{value!r} conflicts with parallel_config.{key}: {nested!r}")
                pc[key] = raw
            data["parallel_config"] = pc
        return data

    def _check(self, path: str) -> None:
        p = f"{path}." if path else ""
        for key, value in self.default_sampling_params.items():
            want = _SAMPLING_TYPES.get(key)
            if want is not None and value is not None:
                _convert(value, want, f"{p}default_sampling_params.{key}")
        for attr, direction in (("input_connectors", "from"), ("output_connectors", "to")):
            for edge in getattr(self, attr):
                m = _EDGE_RE.match(edge)
                if not m or m.group(1) != direction:
                    raise _FieldError(f"{p}{attr}.{edge}",
                                      f"edge names must look like '{direction}_stage_<id>'")


@dataclass(frozen=True)
class ConnectorConfig:
    """A named transport for stage hand-offs (e.g. SharedMemoryConnector)."""

    name: str = _opt()
    extra: dict[str, Any] = _opt(factory=dict)


@dataclass(frozen=True)
class DeployConfig:
    """A whole deploy config: the pipeline, its stages and the pipeline-wide knobs."""

    stages: list[StageConfig] = _opt()
    pipeline: str | None = None
    async_chunk: bool = False
    base_config: str | None = None
    connectors: dict[str, ConnectorConfig] = _opt(factory=dict)
    edges: list[dict[str, Any]] | None = None
    platforms: dict[str, dict[str, Any]] | None = None
    session_mode: str | None = None
    trust_remote_code: bool | None = None
    dtype: str | None = _opt(None, choices=("auto", "bfloat16", "bf16", "float16", "fp16", "half",
                                            "float32", "fp32", "float"))
    quantization: str | None = None
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    distributed_executor_backend: str | None = None
    data_parallel_size: int | None = _opt(None, ge=1)
    pipeline_parallel_size: int | None = _opt(None, ge=1)
    # Not YAML keys: where the config came from and the merged mapping it was built from.
    source: str | None = _opt(None, internal=True)
    raw: dict[str, Any] = _opt(factory=dict, internal=True)

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

    def require_runnable(self) -> None:
        """Raise NotImplementedError naming every part of this config the engine cannot run yet.

        Whether the stages can be placed (worker backend) is the engine options' question, not this one."""
        missing: list[str] = []
        for i, s in enumerate(self.stages):
            pc = s.parallel_config
            where = f"stages[{i}]"
            checks = [
                ("tensor parallel", "tensor_parallel_size", pc.tensor_parallel_size > 1),
                ("CFG parallel", "cfg_parallel_size", pc.cfg_parallel_size > 1),
                ("VAE patch parallel", "vae_patch_parallel_size", pc.vae_patch_parallel_size > 1),
                ("HSDP", "use_hsdp", pc.use_hsdp),
                ("sequence parallel", "sequence_parallel_size", pc.effective_sequence_parallel_size > 1),
                ("pipeline parallel", "pipeline_parallel_size", pc.pipeline_parallel_size > 1),
                ("data parallel", "data_parallel_size", pc.data_parallel_size > 1),
                ("expert parallel", "enable_expert_parallel", pc.enable_expert_parallel),
            ]
            for label, key, bad in checks:
                if bad:
                    value = (pc.effective_sequence_parallel_size if key == "sequence_parallel_size"
                             else getattr(pc, key))
                    missing.append(f"{label} ({where}.parallel_config.{key}={value!r}) is not built yet")
            if s.vae_use_tiling:
                missing.append(f"VAE tiling ({where}.vae_use_tiling=true) is not built yet")
            if s.num_replicas > 1:
                missing.append(f"stage replicas ({where}.num_replicas={s.num_replicas}) are not built yet")
        for key in ("data_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, key)
            if value is not None and value > 1:
                label = key.replace("_size", "").replace("_", " ")
                missing.append(f"{label} ({key}={value}) is not built yet")
        if self.quantization is not None:
            missing.append(f"quantization (quantization={self.quantization!r}) is not built yet")
        if missing:
            src = f"{self.source}: " if self.source else ""
            raise NotImplementedError(f"{src}deploy config cannot run yet: " + "; ".join(missing))

    def _check(self, path: str) -> None:
        if not self.stages:
            raise _FieldError("stages", "at least one stage is required")
        seen: dict[int, int] = {}
        for i, s in enumerate(self.stages):
            if s.stage_id in seen:
                raise _FieldError(f"stages[{i}].stage_id",
                                  f"duplicate stage id {s.stage_id} (also stages[{seen[s.stage_id]}])")
            seen[s.stage_id] = i
        ids = sorted(seen)
        if ids != list(range(len(ids))):
            raise _FieldError("stages", f"stage ids must be 0..{len(ids) - 1}, got {ids}")
        for i, s in enumerate(self.stages):
            for attr in ("input_connectors", "output_connectors"):
                for edge, conn in getattr(s, attr).items():
                    where = f"stages[{i}].{attr}.{edge}"
                    other = int(_EDGE_RE.match(edge).group(2))
                    if other not in seen or other == s.stage_id:
                        raise _FieldError(where, f"no other stage with id {other}")
                    if conn not in self.connectors:
                        known = ", ".join(sorted(self.connectors)) or "none defined"
                        raise _FieldError(where, f"connector {conn!r} is not defined in connectors "
                                                 f"(defined: {known})")
        for i, edge in enumerate(self.edges or []):
            for key in ("from", "to"):
                if key not in edge:
                    raise _FieldError(f"edges[{i}]", f"missing '{key}'")
                value = _convert(edge[key], int, f"edges[{i}].{key}")
                if value not in seen:
                    raise _FieldError(f"edges[{i}].{key}", f"no stage with id {value}")


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
            raise _FieldError(path, f"expected a device index or a comma list of them (like \"0,1\"), got {value!r}")
        if int(part) < 0:
            raise _FieldError(path, f"device indices must be >= 0, got {value!r}")
        out.append(str(int(part)))
    if not out:
        raise _FieldError(path, "no devices given")
    return ",".join(out)


# ---------------------------------------------------------------------------------------------------------
# Generic validator: builds the dataclasses above from YAML mappings using their type hints.


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in typing.get_args(tp) else "")
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "mapping"
    if origin is list or tp is list:
        return "list"
    if tp is float:
        return "number"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _FieldError(path, f"expected {_type_name(tp)}, got null")
        (inner,) = [a for a in args if a is not type(None)]  # the schema only uses `X | None`
        try:
            return _convert(value, inner, path)
        except _FieldError as err:
            if err.path != path:  # an error inside the value (a mapping or list) is the real one
                raise
            raise _FieldError(path, f"expected {_type_name(tp)}, got {_short(value)}") from None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _FieldError(path, f"expected mapping, got {_short(value)}")
        return _build(tp, value, path)
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _FieldError(path, f"expected mapping, got {_short(value)}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _FieldError(path, f"keys must be strings, got {_short(k)}")
            out[k] = _convert(v, val_tp, f"{path}.{k}")
        return out
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _FieldError(path, f"expected list, got {_short(value)}")
        return [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported schema type {tp!r} at {path}")
    raise _FieldError(path, f"expected {_type_name(tp)}, got {_short(value)}")


def _convert_field(f: dataclasses.Field, tp: Any, raw: Any, path: str) -> Any:
    value = _convert(raw, tp, path)
    if value is None or isinstance(value, bool):
        return value
    meta = f.metadata
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise _FieldError(path, f"must be one of {', '.join(map(str, meta['choices']))}, got {_short(value)}")
    if isinstance(value, (int, float)):
        if meta.get("ge") is not None and value < meta["ge"]:
            raise _FieldError(path, f"must be >= {meta['ge']}, got {value!r}")
        if meta.get("gt") is not None and value <= meta["gt"]:
            raise _FieldError(path, f"must be > {meta['gt']}, got {value!r}")
        if meta.get("le") is not None and value > meta["le"]:
            raise _FieldError(path, f"must be <= {meta['le']}, got {value!r}")
    return value


def _yaml_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _known_keys(cls: type) -> list[str]:
    extra = cls._extra_keys() if hasattr(cls, "_extra_keys") else ()
    return sorted([*_yaml_fields(cls), *extra])


def _build(cls: type, data: Mapping[str, Any], path: str, **internal: Any) -> Any:
    if hasattr(cls, "_preprocess"):
        data = cls._preprocess(dict(data), path)
    fields = _yaml_fields(cls)
    hints = typing.get_type_hints(cls)
    known = _known_keys(cls)
    p = f"{path}." if path else ""
    kwargs: dict[str, Any] = {}
    for key, raw in data.items():
        if not isinstance(key, str):
            raise _FieldError(path, f"keys must be strings, got {_short(key)}")
        if key not in fields:
            hint = difflib.get_close_matches(key, known, n=1)
            did = f"; did you mean {hint[0]!r}?" if hint else ""
            raise _FieldError(f"{p}{key}", f"unknown key (known: {', '.join(known)}){did}")
        kwargs[key] = _convert_field(fields[key], hints[key], raw, f"{p}{key}")
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _FieldError(f"{p}{name}", "required key is missing")
    obj = cls(**kwargs, **internal)
    if hasattr(obj, "_check"):
        obj._check(path)
    return obj


# ---------------------------------------------------------------------------------------------------------
# Loading, base_config merging, overrides.


def _merge(base: Any, child: Any, path: str) -> Any:
    """Deep-merge `child` over `base`: mappings merge key by key, `stages` lists by stage_id, other values replace."""
    if isinstance(base, dict) and isinstance(child, dict):
        out = dict(base)
        for key, value in child.items():
            sub = f"{path}.{key}" if path else str(key)
            if key in out:
                if key == "stages" and not path and isinstance(out[key], list) and isinstance(value, list):
                    out[key] = _merge_stages(out[key], value)
                else:
                    out[key] = _merge(out[key], value, sub)
            else:
                out[key] = copy.deepcopy(value)
        return out
    return copy.deepcopy(child)


def _merge_stages(base: list, child: list) -> list:
    def index(stages: list, which: str) -> dict[Any, int]:
        ids: dict[Any, int] = {}
        for i, s in enumerate(stages):
            if not isinstance(s, dict):
                raise _FieldError(f"stages[{i}]", f"expected mapping, got {_short(s)} ({which})")
            if "stage_id" not in s:
                raise _FieldError(f"stages[{i}].stage_id", f"required key is missing ({which})")
            if s["stage_id"] in ids:
                raise _FieldError(f"stages[{i}].stage_id", f"duplicate stage id {s['stage_id']!r} ({which})")
            ids[s["stage_id"]] = i
        return ids

    base_ids = index(base, "in base_config")
    index(child, "in the overriding file")
    out = [copy.deepcopy(s) for s in base]
    for s in child:
        if s["stage_id"] in base_ids:
            i = base_ids[s["stage_id"]]
            out[i] = _merge(out[i], s, f"stages[{i}]")
        else:
            out.append(copy.deepcopy(s))
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DeployConfigError(f"{path}: deploy config not found") from None
    except OSError as err:
        raise DeployConfigError(f"{path}: cannot read deploy config: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = err.problem or "malformed"
        if err.context:
            ctx = err.context_mark
            started = f" (started at line {ctx.line + 1})" if ctx is not None and mark is not ctx else ""
            what = f"{err.context}{started}: {what}"
        raise DeployConfigError(f"{where}: invalid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise DeployConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        raise DeployConfigError(f"{path}: deploy config is empty (expected a mapping with at least `stages:`)")
    if not isinstance(data, dict):
        raise DeployConfigError(f"{path}: the top level of a deploy config must be a mapping, "
                                f"got {type(data).__name__}")
    return data


def _load_merged(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    key = path.resolve()
    if key in chain:
        cycle = " -> ".join(str(p) for p in (*chain, key))
        raise DeployConfigError(f"{chain[0]}: base_config cycle: {cycle}")
    data = _read_yaml(path)
    base = data.get("base_config")
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise DeployConfigError(f"{path}: base_config: expected str, got {_short(base)}")
    candidates = [path.parent / base]
    bundled = _bundled_dir_or_none()
    if bundled is not None and not Path(base).is_absolute():
        candidates.append(bundled / base)
    base_path = next((c for c in candidates if c.is_file()), None)
    if base_path is None:
        tried = ", ".join(str(c) for c in candidates)
        raise DeployConfigError(f"{path}: base_config: {base!r} not found (tried {tried})")
    merged_base = _load_merged(base_path, (*chain, key))
    merged_base.pop("base_config", None)
    try:
        return _merge(merged_base, data, "")
    except _FieldError as err:
        raise DeployConfigError(f"{path} (merging base_config {base!r}): {err}") from None


def parse_deploy_config(data: Mapping[str, Any], source: str | None = None) -> DeployConfig:
    """Validate an already-loaded (and base-merged) mapping into a DeployConfig."""
    prefix = f"{source}: " if source else ""
    if not isinstance(data, Mapping):
        raise DeployConfigError(f"{prefix}the top level of a deploy config must be a mapping, "
                                f"got {type(data).__name__}")
    raw = copy.deepcopy(dict(data))
    try:
        cfg = _build(DeployConfig, raw, "", source=source, raw=copy.deepcopy(raw))
    except _FieldError as err:
        raise DeployConfigError(f"{prefix}{err}") from None
    stages = sorted(cfg.stages, key=lambda s: s.stage_id)
    return dataclasses.replace(cfg, stages=stages)


def load_deploy_config(path: str | Path) -> DeployConfig:
    """Read, base-merge and validate a deploy YAML. Raises DeployConfigError naming the file and YAML path."""
    path = Path(path)
    merged = _load_merged(path, ())
    source = str(path)
    if "base_config" in merged:
        source += f" (with base_config {merged['base_config']!r})"
    return parse_deploy_config(merged, source=source)


def apply_overrides(config: DeployConfig, global_overrides: Mapping[str, Any] | None = None,
                    stage_overrides: Mapping[int | str, Mapping[str, Any]] | None = None) -> DeployConfig:
    """Return `config` with command-line style overrides applied and re-validated.

    Precedence (highest first), as in vllm-omni: `stage_overrides` ({stage_id: {key: value}}) > keys of the
    form `stage_<id>_<key>` in `global_overrides` > other `global_overrides` > the YAML. A global key that is
    a pipeline-wide field (e.g. `quantization`, `dtype`) sets it; a stage key (e.g. `cfg_parallel_size`,
    `gpu_memory_utilization`) is applied to every stage. None values are skipped (flag not given).
    """
    raw = copy.deepcopy(config.raw)
    top_keys = set(_yaml_fields(DeployConfig)) - {"stages"}
    stage_keys = set(_known_keys(StageConfig)) - {"stage_id"}
    ids = [s.get("stage_id") for s in raw.get("stages", [])]

    def set_stage(stage: dict, key: str, value: Any) -> None:
        if key in FLAT_PARALLEL_KEYS and isinstance(stage.get("parallel_config", {}), dict):
            stage.pop(key, None)
            stage["parallel_config"] = {**(stage.get("parallel_config") or {}), key: value}
        elif isinstance(value, dict) and isinstance(stage.get(key), dict):
            stage[key] = _merge(stage[key], value, key)
        else:
            stage[key] = value

    per_stage: dict[int, dict[str, Any]] = {}
    for key, value in (global_overrides or {}).items():
        if value is None:
            continue
        m = re.match(r"^stage_(\d+)_(.+)$", key)
        if m:
            per_stage.setdefault(int(m.group(1)), {})[m.group(2)] = value
        elif key in top_keys:
            raw[key] = value
        elif key in stage_keys:
            for stage in raw["stages"]:
                set_stage(stage, key, value)
        else:
            known = ", ".join(sorted(top_keys | stage_keys))
            raise DeployConfigError(f"overrides: {key}: unknown key (known: {known})")
    for sid, values in (stage_overrides or {}).items():
        per_stage.setdefault(int(sid), {}).update(values)
    for sid, values in sorted(per_stage.items()):
        if sid not in ids:
            raise DeployConfigError(f"overrides: stage {sid}: no such stage (stage ids: {ids})")
        stage = raw["stages"][ids.index(sid)]
        for key, value in values.items():
            if key not in stage_keys:
                raise DeployConfigError(f"overrides: stage {sid}: {key}: unknown key "
                                        f"(known: {', '.join(sorted(stage_keys))})")
            if value is not None:
                set_stage(stage, key, value)
    source = f"{config.source} (with overrides)" if config.source else "overrides"
    return parse_deploy_config(raw, source=source)


# ---------------------------------------------------------------------------------------------------------
# Pipeline registry.


@dataclass(frozen=True)
class StageRole:
    """What a stage of a pipeline does."""

    stage_id: int
    name: str            # "thinker" | "dit"
    kind: str            # "ar" (autoregressive) | "diffusion"
    final_output: str    # what the stage returns to the user: "text" | "image" | "text+image"
    input_from: int | None = None


@dataclass(frozen=True)
class PipelineSpec:
    """A topology: its stages' roles, when KV is handed over, and its bundled default deploy file."""

    name: str
    stages: tuple[StageRole, ...]
    description: str
    default_deploy_config: str
    kv_handoff: str | None = None  # "prefill_finished" | "request_finished" | None (single stage)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def single_stage(self) -> bool:
        return self.num_stages == 1


_THINKER = StageRole(0, "thinker", "ar", "text")
_DIT_AFTER_THINKER = StageRole(1, "dit", "diffusion", "image", input_from=0)

PIPELINES: dict[str, PipelineSpec] = {
    "bagel": PipelineSpec(
        "bagel", (_THINKER, _DIT_AFTER_THINKER),
        "two stages: the Thinker (AR) builds every context and serves text; for image requests it hands the "
        "context KV (full and CFG contexts) to the DiT when prefill finishes",
        default_deploy_config="bagel.yaml", kv_handoff="prefill_finished"),
    "bagel_think": PipelineSpec(
        "bagel_think", (_THINKER, _DIT_AFTER_THINKER),
        "two stages like `bagel`, but the Thinker decodes the <think> plan before handing the KV to the DiT "
        "(hand-off when the request finishes)",
        default_deploy_config="bagel_think.yaml", kv_handoff="request_finished"),
    "bagel_single_stage": PipelineSpec(
        "bagel_single_stage", (StageRole(0, "dit", "diffusion", "text+image"),),
        "one stage runs everything: prefill, text/think decode, denoising and VAE",
        default_deploy_config="bagel_single_stage.yaml"),
}

# The pipeline a BAGEL model gets when nothing chooses one. Becomes "bagel" when two-stage lands.
_DEFAULT_BAGEL_PIPELINE = "bagel_single_stage"


def is_bagel_model_config(model_config_json: Mapping[str, Any] | None) -> bool:
    """Whether a checkpoint's config.json describes a BAGEL model."""
    if not model_config_json:
        return False
    if model_config_json.get("model_type") == "bagel":
        return True
    if "llm_config" in model_config_json and "vit_config" in model_config_json:
        return True
    archs = model_config_json.get("architectures") or []
    return isinstance(archs, list) and any(isinstance(a, str) and "Bagel" in a for a in archs)


def _lookup_pipeline(name: str, source: str | None) -> PipelineSpec:
    if name not in PIPELINES:
        prefix = f"{source}: " if source else ""
        hint = difflib.get_close_matches(name, PIPELINES, n=1)
        did = f"; did you mean {hint[0]!r}?" if hint else ""
        raise DeployConfigError(f"{prefix}pipeline: unknown pipeline {name!r} "
                                f"(known: {', '.join(PIPELINES)}){did}")
    return PIPELINES[name]


def resolve_pipeline(deploy: DeployConfig | None, model_config_json: Mapping[str, Any] | None) -> PipelineSpec:
    """Pick the pipeline: the deploy config's `pipeline:` wins; else the model's config.json decides.

    Without `pipeline:`, a BAGEL model gets `bagel` for a two-stage deploy config and `bagel_single_stage`
    for a one-stage one (and `bagel_single_stage` with no deploy config at all, while only single-stage
    runs). The deploy config's stage count must match the pipeline's.
    """
    source = deploy.source if deploy is not None else None
    prefix = f"{source}: " if source else ""
    if deploy is not None and deploy.pipeline is not None:
        spec = _lookup_pipeline(deploy.pipeline, source)
    elif is_bagel_model_config(model_config_json):
        if deploy is None:
            spec = PIPELINES[_DEFAULT_BAGEL_PIPELINE]
        else:
            spec = PIPELINES["bagel_single_stage" if len(deploy.stages) == 1 else "bagel"]
    else:
        cfg = model_config_json or {}
        what = (f"model_type={cfg.get('model_type')!r}, architectures={cfg.get('architectures')!r}"
                if model_config_json else "no config.json given")
        raise DeployConfigError(f"{prefix}cannot determine the pipeline: the deploy config has no `pipeline:` key "
                                f"and the model is not recognised as BAGEL ({what}); "
                                f"set `pipeline:` to one of {', '.join(PIPELINES)}")
    if deploy is not None:
        if len(deploy.stages) != spec.num_stages:
            roles = ", ".join(f"{r.stage_id} {r.name}" for r in spec.stages)
            raise DeployConfigError(f"{prefix}pipeline {spec.name!r} has {spec.num_stages} stage(s) ({roles}) "
                                    f"but the deploy config defines {len(deploy.stages)}")
        if deploy.async_chunk and not spec.single_stage:
            raise DeployConfigError(f"{prefix}async_chunk: must be false for pipeline {spec.name!r} "
                                    f"(BAGEL stages have no per-step async producer)")
    return spec


# ---------------------------------------------------------------------------------------------------------
# Bundled deploy files (top-level deploy/ directory of the source tree).


def _bundled_dir_or_none() -> Path | None:
    d = Path(__file__).resolve().parents[2] / "deploy"
    return d if d.is_dir() else None


def bundled_deploy_dir() -> Path:
    d = _bundled_dir_or_none()
    if d is None:
        raise DeployConfigError(f"bundled deploy configs not found at {Path(__file__).resolve().parents[2] / 'deploy'} "
                                f"(bagel-serve installed without its source tree?); pass a deploy config path")
    return d


def bundled_deploy_config(name: str) -> Path:
    """Path of a bundled deploy file: `bundled_deploy_config("bagel")` -> `<repo>/deploy/bagel.yaml`."""
    d = bundled_deploy_dir()
    fname = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    path = d / fname
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in d.glob("*.yaml")))
        raise DeployConfigError(f"no bundled deploy config {name!r} in {d} (bundled: {known})")
    return path


def default_deploy_config(model_config_json: Mapping[str, Any] | None = None, think: bool = False) -> Path:
    """The bundled deploy file used when the user gives none.

    While only single-stage runs, a BAGEL model (or an unknown one: None) gets `bagel_single_stage.yaml`,
    with or without think. When the two-stage topology lands this becomes `bagel.yaml` / `bagel_think.yaml`.
    """
    del think  # think mode runs in the single stage; it picks bagel_think.yaml once two-stage exists
    if model_config_json is not None and not is_bagel_model_config(model_config_json):
        raise DeployConfigError(f"no default deploy config: the model is not recognised as BAGEL "
                                f"(model_type={model_config_json.get('model_type')!r}, "
                                f"architectures={model_config_json.get('architectures')!r})")
    return bundled_deploy_config(PIPELINES[_DEFAULT_BAGEL_PIPELINE].default_deploy_config)
