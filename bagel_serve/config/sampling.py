"""Sampling limits shared by requests and deploy configs, and a stage's `default_sampling_params`.

`SamplingParams` is the schema of `default_sampling_params` in a deploy YAML (vllm-omni's key names). Only
the keys bagel-serve honours are declared, plus its own `enable_taylorseer`; any other key (vLLM has many:
`min_p`, `presence_penalty`, ...) is refused by name when the file loads. `engine/request.py` turns them into
request defaults (`temperature` becomes `text_temperature`, and `do_sample = temperature > 0`).
"""

from __future__ import annotations

from dataclasses import dataclass

from bagel_serve.config.validate import opt

MAX_TOKENS_LIMIT = 2**20
"""The most tokens a request may ask to generate (the exact prompt + output bound is the model's context)."""
SEED_MAX = 2**63 - 1
"""Seeds are torch generator seeds: integers in [0, 2**63 - 1]."""
MAX_STEPS = 1000
"""The most denoising timesteps a request may ask for."""
RENORM_TYPES = ("global", "channel", "text_channel")
"""How guided velocities are renormalised (`cfg_renorm_type`, the reference's names)."""


@dataclass(frozen=True)
class SamplingParams:
    """A stage's `default_sampling_params`: defaults of each request (a request's own value wins)."""

    temperature: float | None = opt(None, ge=0.0)
    """Text sampling temperature; 0 = greedy. Sets `text_temperature` and `do_sample = temperature > 0`."""
    top_p: float | None = opt(None, gt=0.0, le=1.0)
    top_k: int | None = opt(None, ge=0)
    """0 = off."""
    max_tokens: int | None = opt(None, ge=1, le=MAX_TOKENS_LIMIT)
    """Most generated tokens of a text answer (think included)."""
    seed: int | None = opt(None, ge=0, le=SEED_MAX)
    repetition_penalty: float | None = opt(None, gt=0.0)
    detokenize: bool | None = None
    """Outputs are always detokenized; `true` is accepted, `false` cannot be honoured."""
    enable_taylorseer: bool | None = None
    """bagel-serve's own key: TaylorSeer step caching of image requests (the request field of that name)."""
