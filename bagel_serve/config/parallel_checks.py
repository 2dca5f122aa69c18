"""Checks of a deploy config against the model, which only the checkpoint's config.json knows (its parallel
layout; the image sizes it captures graphs for): made by `Omni` after it reads that file and before any weight
loads, so that a layout the model cannot take fails at once, with the numbers, instead of in a shape error deep
in the loader."""

from __future__ import annotations

import math

from bagel_serve.config.deploy import DeployConfig, DeployConfigError
from bagel_serve.config.model_config import BagelConfig, LLMConfig
from bagel_serve.config.validate import ValidationError

__all__ = ["check_graph_sizes_against_model", "check_parallel_against_model", "tensor_parallel_sizes"]


def tensor_parallel_sizes(llm: LLMConfig) -> list[int]:
    """The tensor parallel sizes the LLM can be split into: those dividing both its query heads and its
    key/value heads (each rank holds whole heads and the K/V heads its query heads use). BAGEL-7B (28 and 4
    heads): 1, 2, 4."""
    common = math.gcd(llm.num_attention_heads, llm.num_key_value_heads)
    return [n for n in range(1, common + 1) if common % n == 0]


def check_parallel_against_model(deploy: DeployConfig, llm: LLMConfig) -> None:
    """Raise DeployConfigError (naming the file and the YAML path) for a stage whose
    `tensor_parallel_size` does not divide the model's attention heads and key/value heads."""
    heads, kv_heads = llm.num_attention_heads, llm.num_key_value_heads
    for i, stage in enumerate(deploy.stages):
        tp = stage.tensor_parallel_size
        if heads % tp or kv_heads % tp:
            sizes = ", ".join(map(str, tensor_parallel_sizes(llm)))
            err = ValidationError(f"stages[{i}].parallel_config.tensor_parallel_size",
                                  f"{tp} must divide the model's {heads} attention heads and {kv_heads} key/value "
                                  f"heads (this model takes tensor_parallel_size {sizes})")
            src = f"{deploy.source}: " if deploy.source else ""
            raise DeployConfigError(f"{src}{err}")


def check_graph_sizes_against_model(deploy: DeployConfig, cfg: BagelConfig) -> None:
    """Raise DeployConfigError for a `denoise_graph_sizes` entry the model cannot generate: each side a
    positive multiple of its latent token's side, at most its largest image side. (The default, null, takes
    the default sizes the model generates: `engine.denoise_graphs.graph_sizes`.)"""
    step, top = cfg.latent_downsample, cfg.max_image_side
    for i, stage in enumerate(deploy.stages):
        for j, (h, w) in enumerate(stage.denoise_graph_sizes or ()):
            if not all(0 < x <= top and x % step == 0 for x in (h, w)):
                err = ValidationError(f"stages[{i}].denoise_graph_sizes[{j}]",
                                      f"[{h}, {w}]: each side must be a multiple of {step} from {step} to {top} "
                                      f"(the image sizes this model generates)")
                src = f"{deploy.source}: " if deploy.source else ""
                raise DeployConfigError(f"{src}{err}")
