"""Engine options: the keyword arguments users of the seed system pass to `Omni(...)` and, as flags, to
the CLI. Validated here once, so the API and the CLI say the same thing about the same mistake; each
message names the keyword and its flag.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

WORKER_BACKENDS = ("process", "multi_process", "inline", "ray")
QUANTIZATIONS = ("fp8",)


class EngineOptionError(ValueError):
    """An engine option has a wrong type or value."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _name(name: str) -> str:
    return f"{name} ({flag(name)})"


@dataclass(frozen=True)
class EngineOptions:
    tensor_parallel_size: int | None = None
    cfg_parallel_size: int | None = None
    vae_patch_parallel_size: int | None = None
    vae_use_tiling: bool | None = None
    use_hsdp: bool | None = None
    hsdp_shard_size: int | None = None
    hsdp_replicate_size: int | None = None
    quantization: str | None = None
    worker_backend: str = "process"
    ray_address: str | None = None
    stage_overrides: dict[str, Any] | None = None
    log_stats: bool = False
    enable_diffusion_pipeline_profiler: bool = False
    init_timeout: float = 300.0
    stage_init_timeout: float = 300.0
    batch_timeout: float = 5.0
    request_timeout: float = 60.0
    """Seconds a request may wait on a stage worker that shows no sign of life (no token, output or heartbeat)."""
    enforce_eager: bool | None = None

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> "EngineOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = dict(kwargs)
        so = values.get("stage_overrides")
        if isinstance(so, str):
            try:
                values["stage_overrides"] = json.loads(so)
            except json.JSONDecodeError as e:
                raise EngineOptionError(f"{_name('stage_overrides')}: not valid JSON: {e}") from None
        opts = cls(**values)
        opts._check()
        return opts

    def _check(self) -> None:
        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise EngineOptionError(f"{_name(name)} must be a positive integer, got {v!r}")

        for name in ("tensor_parallel_size", "vae_patch_parallel_size", "hsdp_replicate_size"):
            positive_int(name)
        if self.cfg_parallel_size not in (None, 1, 2, 3):
            raise EngineOptionError(f"{_name('cfg_parallel_size')} must be 1, 2 or 3, got {self.cfg_parallel_size!r}")
        if self.hsdp_shard_size is not None and (isinstance(self.hsdp_shard_size, bool) or not isinstance(self.hsdp_shard_size, int)
                                                 or (self.hsdp_shard_size < 1 and self.hsdp_shard_size != -1)):
            raise EngineOptionError(f"{_name('hsdp_shard_size')} must be a positive integer or -1 (auto), got {self.hsdp_shard_size!r}")
        for name in ("vae_use_tiling", "use_hsdp", "log_stats", "enable_diffusion_pipeline_profiler", "enforce_eager"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise EngineOptionError(f"{_name(name)} must be true or false, got {v!r}")
        if self.worker_backend not in WORKER_BACKENDS:
            raise EngineOptionError(f"{_name('worker_backend')} must be one of {', '.join(WORKER_BACKENDS)}, got {self.worker_backend!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise EngineOptionError(f"{_name('quantization')} must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        for name in ("init_timeout", "stage_init_timeout", "batch_timeout", "request_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise EngineOptionError(f"{_name(name)} must be a positive number of seconds, got {v!r}")
        if self.stage_overrides is not None and not isinstance(self.stage_overrides, dict):
            raise EngineOptionError(f"{_name('stage_overrides')} must be a mapping of stage id to settings")

    def deploy_overrides(self) -> dict[str, Any]:
        """Options that override every stage of the deploy config (None = not given)."""
        return {k: getattr(self, k) for k in ("tensor_parallel_size", "cfg_parallel_size", "vae_patch_parallel_size",
                                              "vae_use_tiling", "use_hsdp", "hsdp_shard_size", "hsdp_replicate_size",
                                              "quantization")}

    @property
    def uses_ray(self) -> bool:
        """Ray places the stages: `worker_backend=ray`, or a `ray_address` (which implies it)."""
        return self.worker_backend == "ray" or self.ray_address is not None

    def require_runnable(self, num_stages: int = 1) -> None:
        """Refuse, by name, what the engine cannot do: a flag is never silently ignored.

        `inline` runs every stage in this process (two stages hand contexts over by reference). `process`
        (or `multi_process`) places one process per stage: for a single stage that is this process; two
        stages run in two worker processes (`bagel_serve.pipeline.workers`). `ray` places one Ray actor
        per stage (`bagel_serve.pipeline.ray_workers`); `ray_address` implies it.
        """
        if self.ray_address is not None and self.worker_backend in ("inline", "multi_process"):
            raise EngineOptionError(
                f"{_name('ray_address')} places the stages with Ray, but {_name('worker_backend')} is "
                f"{self.worker_backend!r}; use worker_backend=ray (or leave it out)")
        if num_stages > 2 and self.worker_backend in ("process", "multi_process") and not self.uses_ray:
            raise NotImplementedError(
                f"{_name('worker_backend')}={self.worker_backend}: one process per stage runs pipelines of at most "
                f"two stages; run the {num_stages} stages in this process with worker_backend=inline (--worker-backend inline)"
            )
