"""Engine options: the keyword arguments users of the seed system pass to `Omni(...)` and, as flags, to
the CLI. Validated here once, by the one validator (`config.validate`), so the API and the CLI say the same
thing about the same mistake; each message names the keyword and its flag.

Options left at None were not given: the deploy config's value stands. The stage options (`max_num_seqs`,
`kv_cache_blocks`, `enforce_eager`, `tensor_parallel_size`, ...) override that key in every stage; the
diffusion options (`cfg_parallel_size`, `vae_patch_parallel_size`, `vae_use_tiling`, `use_hsdp`,
`hsdp_shard_size`, `hsdp_replicate_size`) in the stages that denoise, the DiT or the single stage
(`deploy_overrides()`); `stage_overrides` sets keys of single stages and wins over both.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any, Sequence

from bagel_serve.config.parallel import CFG_PARALLEL_SIZES
from bagel_serve.config.dtypes import DTYPES, VAE_PRECISIONS
from bagel_serve.config.quantization import QUANTIZATIONS
from bagel_serve.config.validate import ValidationError, check_field, opt

if typing.TYPE_CHECKING:
    import torch

WORKER_BACKENDS = ("process", "multi_process", "inline", "ray")

# Options that set the deploy config key of the same name in every stage (None = not given).
STAGE_OVERRIDE_KEYS = (
    "tensor_parallel_size", "enforce_eager", "max_model_len", "gpu_memory_utilization",
    "max_num_seqs", "max_num_batched_tokens", "kv_cache_blocks", "vae_precision",
)
# Options that set the deploy config key of the same name in the diffusion stages only (as in the seed,
# where they are diffusion engine options): the Thinker has no denoising branches and no VAE decode.
DIFFUSION_OVERRIDE_KEYS = (
    "cfg_parallel_size", "vae_patch_parallel_size", "vae_use_tiling", "use_hsdp", "hsdp_shard_size",
    "hsdp_replicate_size",
)
# Options that set a pipeline-wide deploy config key.
GLOBAL_OVERRIDE_KEYS = ("quantization", "fp8_und", "fp8_attention")


class EngineOptionError(ValueError):
    """An engine option has a wrong type or value."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _name(name: str) -> str:
    return f"{name} ({flag(name)})"


def parse_dtype(name: str) -> torch.dtype | None:
    """The torch dtype a name of `DTYPES` means (`--dtype`, `Omni(dtype=...)`, the deploy config's `dtype`);
    None for "auto" (bf16 on CUDA, fp32 on the CPU)."""
    if name not in DTYPES:
        raise EngineOptionError(f"dtype (--dtype) must be one of {', '.join(DTYPES)}, got {name!r}")
    import torch

    return None if DTYPES[name] is None else getattr(torch, DTYPES[name])


@dataclass(frozen=True)
class EngineOptions:
    """`Omni`'s keyword arguments besides model, device, dtype and deploy config, and the CLI's engine flags
    (each field's flag is `--` + its name with dashes). None: not given."""

    # Parallel layout (`docs/parallelism.md`; checked with the deploy config it overrides) and quantization.
    tensor_parallel_size: int | None = opt(None, ge=1)
    cfg_parallel_size: int | None = opt(None, choices=CFG_PARALLEL_SIZES)
    vae_patch_parallel_size: int | None = opt(None, ge=1)
    vae_use_tiling: bool | None = None
    use_hsdp: bool | None = None
    hsdp_shard_size: int | None = opt(None, ge=-1)
    hsdp_replicate_size: int | None = opt(None, ge=1)
    quantization: str | None = opt(None, choices=QUANTIZATIONS)
    """FP8 (W8A8 e4m3) for the generation expert's projections (`config.quantization`)."""
    fp8_und: bool | None = None
    """With quantization=fp8: the understanding expert's projections too (changes text outputs slightly)."""
    fp8_attention: bool | None = None
    """With quantization=fp8: large images' denoising attention in FP8 too (changes images more than FP8 alone)."""
    # Stage limits, applied to every stage.
    enforce_eager: bool | None = None
    max_model_len: int | None = opt(None, ge=1)
    gpu_memory_utilization: float | None = opt(None, gt=0.0, le=1.0)
    max_num_seqs: int | None = opt(None, ge=1)
    max_num_batched_tokens: int | None = opt(None, ge=1)
    kv_cache_blocks: int | None = opt(None, ge=1)
    vae_precision: str | None = opt(None, choices=VAE_PRECISIONS)
    """The VAE's convolutions in every stage (stage 0 encodes input images, the DiT decodes)."""
    # Where the stages run.
    worker_backend: str = opt("process", choices=WORKER_BACKENDS)
    ray_address: str | None = None
    stage_overrides: dict[Any, Any] | None = None
    # Reporting.
    log_stats: bool = False
    enable_diffusion_pipeline_profiler: bool = False
    # Admission.
    max_queue: int | None = opt(None, ge=1)
    """Most unfinished requests (queued or running) the engine holds; a submission beyond it is refused at
    once with `QueueFullError` (None: unbounded)."""
    # Timeouts (seconds).
    init_timeout: float = opt(300.0, gt=0.0)
    stage_init_timeout: float = opt(300.0, gt=0.0)
    batch_timeout: float = opt(5.0, gt=0.0)
    request_timeout: float = opt(60.0, gt=0.0)
    """How long a request may wait on a stage worker that shows no sign of life (no token, output or
    heartbeat) before it fails."""

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
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, value in values.items():
            try:
                values[name] = check_field(fields[name], hints[name], value, name, style="python", given=True)
            except ValidationError as e:
                raise EngineOptionError(f"{_name(name)} {e.reason}") from None
        opts = cls(**values)
        opts._check()
        return opts

    def _check(self) -> None:
        # Also a rule of the deploy schema, checked here too so that the error names the keyword (the deploy
        # one names stages[i].parallel_config.hsdp_shard_size). What stage_overrides holds is checked where it
        # is applied (`deploy_loader.apply_overrides`), with the deploy keys.
        if self.hsdp_shard_size == 0:
            raise EngineOptionError(f"{_name('hsdp_shard_size')} must be -1 (auto) or an integer >= 1, got 0")

    def deploy_overrides(self, diffusion_stage_ids: Sequence[int]) -> dict[str, Any]:
        """Options that override deploy config keys, as `deploy_loader.apply_overrides` takes them: stage
        keys for every stage, diffusion keys as `stage_<id>_<key>` for each of `diffusion_stage_ids` (the
        pipeline's `PipelineSpec.diffusion_stage_ids`), and pipeline-wide keys (None = not given)."""
        out = {k: getattr(self, k) for k in (*STAGE_OVERRIDE_KEYS, *GLOBAL_OVERRIDE_KEYS)}
        for sid in diffusion_stage_ids:
            out.update({f"stage_{sid}_{k}": getattr(self, k) for k in DIFFUSION_OVERRIDE_KEYS})
        return out

    @property
    def uses_ray(self) -> bool:
        """Ray places the stages: `worker_backend=ray`, or a `ray_address` (which implies it)."""
        return self.worker_backend == "ray" or self.ray_address is not None

    def require_runnable(self, num_stages: int = 1) -> None:
        """Refuse, by name, what the engine cannot do: a flag is never silently ignored.

        `inline` runs every stage in this process (two stages hand contexts over by reference). `process`
        (or `multi_process`) places one process per stage: for a single stage that is this process; two
        stages run in two worker processes (`bagel_serve.pipeline.backends.process`). `ray` places one Ray
        actor per stage (`bagel_serve.pipeline.backends.ray`); `ray_address` implies it.
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
        if self.uses_ray:
            import importlib.util

            if importlib.util.find_spec("ray") is None:
                raise EngineOptionError(f"{_name('worker_backend')}=ray needs Ray, which is not installed: "
                                        f"pip install 'bagel-serve[ray]'")
