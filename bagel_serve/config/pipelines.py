"""The pipeline registry: the topologies a BAGEL model can run in, and which one a model gets by default.

  * `bagel`              two stages (the default, as in the seed): 0 "thinker" (autoregressive: contexts,
                         text, think) hands the context KV of image requests to 1 "dit" (diffusion:
                         denoise + VAE decode).
  * `bagel_think`        the same two stages; its default deploy file (`bagel_think.yaml`) is the one chosen
                         for think mode. It differs from `bagel` in nothing else.
  * `bagel_single_stage` one "dit" stage that runs everything.

When stage 0 hands an image request over is the request's business, not the pipeline's: in both two-stage
pipelines it is when the request's context program ends, after its prompt is prefilled and, for a request
with `think`, after its plan is decoded and prefilled too.

With no deploy config, a BAGEL checkpoint (detected from its `config.json`) runs `bagel.yaml`, or
`bagel_think.yaml` when the caller says think mode is wanted; `bagel_single_stage.yaml` selects one stage.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from bagel_serve.config.deploy import DeployConfig, DeployConfigError
from bagel_serve.config.deploy_loader import bundled_deploy_config

__all__ = ["StageRole", "PipelineSpec", "PIPELINES", "DEFAULT_BAGEL_PIPELINE", "is_bagel_model_config",
           "resolve_pipeline", "default_deploy_config"]


@dataclass(frozen=True)
class StageRole:
    """What a stage of a pipeline does."""

    stage_id: int
    name: str            # "thinker" | "dit"
    kind: str            # "ar" (autoregressive) | "diffusion"
    input_from: int | None = None


@dataclass(frozen=True)
class PipelineSpec:
    """A topology: its stages' roles and its bundled default deploy file."""

    name: str
    stages: tuple[StageRole, ...]
    default_deploy_config: str

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def single_stage(self) -> bool:
        return self.num_stages == 1

    @property
    def diffusion_stage_ids(self) -> tuple[int, ...]:
        """The stages that denoise and decode images: where the diffusion options (CFG parallel, VAE patch
        parallel, VAE tiling, HSDP) of `Omni(...)` and the CLI apply."""
        return tuple(r.stage_id for r in self.stages if r.kind == "diffusion")

    @property
    def edges(self) -> list[tuple[int, int]]:
        """The stage graph: (from, to) for every stage fed by another."""
        return [(r.input_from, r.stage_id) for r in self.stages if r.input_from is not None]


_THINKER = StageRole(0, "thinker", "ar")
_DIT_AFTER_THINKER = StageRole(1, "dit", "diffusion", input_from=0)

PIPELINES: dict[str, PipelineSpec] = {
    "bagel": PipelineSpec("bagel", (_THINKER, _DIT_AFTER_THINKER), default_deploy_config="bagel.yaml"),
    "bagel_think": PipelineSpec("bagel_think", (_THINKER, _DIT_AFTER_THINKER),
                                default_deploy_config="bagel_think.yaml"),
    "bagel_single_stage": PipelineSpec("bagel_single_stage", (StageRole(0, "dit", "diffusion"),),
                                       default_deploy_config="bagel_single_stage.yaml"),
}

DEFAULT_BAGEL_PIPELINE = "bagel"
"""The pipeline a BAGEL model gets when nothing chooses one (two stages, as in the seed)."""


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
    for a one-stage one (and `bagel`, the default, with no deploy config at all). A checkpoint without
    `config.json` (`model_config_json` None: the file is optional, the flat llm/vit configs suffice) counts as
    BAGEL, as in `default_deploy_config`. The deploy config must fit the pipeline: its stage count, its
    `edges` (if given), `async_chunk` (false for two stages) and its stages' parallel layouts (no CFG or VAE
    patch parallel on an autoregressive stage).
    """
    source = deploy.source if deploy is not None else None
    prefix = f"{source}: " if source else ""
    if deploy is not None and deploy.pipeline is not None:
        spec = _lookup_pipeline(deploy.pipeline, source)
    elif model_config_json is None or is_bagel_model_config(model_config_json):
        if deploy is None:
            spec = PIPELINES[DEFAULT_BAGEL_PIPELINE]
        else:
            spec = PIPELINES["bagel_single_stage" if len(deploy.stages) == 1 else "bagel"]
    else:
        what = (f"model_type={model_config_json.get('model_type')!r}, "
                f"architectures={model_config_json.get('architectures')!r}")
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
        if deploy.edges is not None:
            given = sorted((e["from"], e["to"]) for e in deploy.edges)
            if given != sorted(spec.edges):
                want = ", ".join(f"{{from: {a}, to: {b}}}" for a, b in spec.edges) or "none"
                raise DeployConfigError(f"{prefix}edges: {given} is not the stage graph of pipeline {spec.name!r} "
                                        f"({want}); its graph is fixed: leave `edges` out")
        _check_stage_roles(deploy, spec, prefix)
    return spec


# Parallel options that split the denoising loop or the VAE decode: meaningless on an autoregressive stage.
_DIFFUSION_ONLY = {"cfg_parallel_size": "CFG parallel spreads the denoising branches",
                   "vae_patch_parallel_size": "VAE patch parallel spreads the VAE tiles of the decoded image"}


def _check_stage_roles(deploy: DeployConfig, spec: PipelineSpec, prefix: str) -> None:
    dit = ", ".join(str(i) for i in spec.diffusion_stage_ids)
    for role in spec.stages:
        if role.kind == "diffusion":
            continue
        pc = deploy.stage(role.stage_id).parallel_config
        for key, what in _DIFFUSION_ONLY.items():
            value = getattr(pc, key)
            if value > 1:
                raise DeployConfigError(
                    f"{prefix}stages[{role.stage_id}].parallel_config.{key}: {value} on stage {role.stage_id} "
                    f"({role.name}, autoregressive) of pipeline {spec.name!r}: {what} over the ranks of the "
                    f"diffusion stage; set it on stage {dit} ({key} 1 here)")


def default_deploy_config(model_config_json: Mapping[str, Any] | None = None, think: bool = False) -> Path:
    """The bundled deploy file used when the user gives none: for a BAGEL model (or a checkpoint without
    config.json: None) `bagel.yaml`, or `bagel_think.yaml` with `think`."""
    if model_config_json is not None and not is_bagel_model_config(model_config_json):
        raise DeployConfigError(f"no default deploy config: the model is not recognised as BAGEL "
                                f"(model_type={model_config_json.get('model_type')!r}, "
                                f"architectures={model_config_json.get('architectures')!r})")
    name = "bagel_think" if think else DEFAULT_BAGEL_PIPELINE
    return bundled_deploy_config(PIPELINES[name].default_deploy_config)
