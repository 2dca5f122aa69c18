"""The Python API: `Omni(model, ...).generate(requests)`; the CLI and server are built on it."""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch

from bagel_serve.engine.request import Request, RequestOutput, make_request
from bagel_serve.engine.runner import Runner
from bagel_serve.engine.tokenizer import BagelTokenizer
from bagel_serve.model.loader import load_model

# Seed-system keyword arguments whose features are not built yet: accepted at their neutral value only.
_NEUTRAL_KWARGS: dict[str, Any] = {
    "tensor_parallel_size": 1,
    "cfg_parallel_size": 1,
    "vae_patch_parallel_size": 1,
    "quantization": None,
}


class Omni:
    """One loaded BAGEL model serving all four modalities.

    `model` is a checkpoint directory or a Hugging Face repo id. Weights are bf16 on CUDA and float32 on
    the CPU unless `dtype` says otherwise.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        deploy_config: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        for name, neutral in _NEUTRAL_KWARGS.items():
            value = kwargs.pop(name, neutral)
            if value != neutral:
                raise NotImplementedError(f"Omni: {name}={value!r} is not supported yet (only {neutral!r})")
        if kwargs:
            raise TypeError(f"Omni: unknown keyword argument(s): {', '.join(sorted(kwargs))}")
        if deploy_config is not None:
            raise NotImplementedError("Omni: deploy_config is not supported yet; the engine runs single-stage")
        if isinstance(dtype, str):
            dtype = _parse_dtype(dtype)
        loaded = load_model(model, device=device, dtype=dtype)
        self.config = loaded.config
        self.model_dir = loaded.model_dir
        self.tokenizer = BagelTokenizer(loaded.model_dir)
        self.runner = Runner(loaded.model, loaded.vae, self.tokenizer)

    @property
    def device(self) -> torch.device:
        return self.runner.model.device

    def generate(self, requests: Request | dict[str, Any] | Iterable[Request | dict[str, Any]]) -> list[RequestOutput]:
        """Run requests (dicts or `Request`s) together; one output per request, in order."""
        if isinstance(requests, (Request, dict)):
            requests = [requests]
        reqs = [make_request(r, i) for i, r in enumerate(requests)]
        return self.runner.generate(reqs)


def _parse_dtype(name: str) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"Omni: dtype must be one of {', '.join(table)}, got {name!r}")
    return table[name]
