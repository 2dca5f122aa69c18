"""Requests and outputs of the engine, and the one place their fields are validated."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from bagel_serve.engine.diffusion import RENORM_TYPES

MODALITIES = ("text2text", "img2text", "text2img", "img2img")


class RequestError(ValueError):
    """A request field is missing or out of range; the message names the request and the field.

    `field` and `reason` carry the same facts apart, so the CLI can name its flag instead.
    """

    def __init__(self, message: str, field: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason


@dataclass
class Request:
    """One generation request. Defaults follow the official inferencer's `gen_image` / app."""

    modality: str
    prompt: str = ""
    image: Image.Image | str | os.PathLike | None = None
    think: bool = False
    max_think_tokens: int = 1000
    max_tokens: int = 512
    do_sample: bool = False
    text_temperature: float = 0.3
    top_k: int = 0
    top_p: float = 1.0
    height: int | None = None
    width: int | None = None
    steps: int = 50
    seed: int | None = None
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.5
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_type: str = "global"
    cfg_renorm_min: float = 0.0
    timestep_shift: float = 3.0
    negative_prompt: str | None = None
    return_latents: bool = False
    noise: torch.Tensor | None = None

    @property
    def outputs_image(self) -> bool:
        return self.modality in ("text2img", "img2img")

    @property
    def needs_image(self) -> bool:
        return self.modality in ("img2text", "img2img")


@dataclass
class RequestOutput:
    request_index: int
    modality: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    think_text: str | None = None
    images: list[Image.Image] = field(default_factory=list)
    latents: torch.Tensor | None = None
    seed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: BaseException | None = None
    """Why this request failed (its other fields are then empty); the others of its batch are unaffected."""

    @property
    def ok(self) -> bool:
        return self.error is None


_FIELDS = {f.name for f in dataclasses.fields(Request)}


def make_request(obj: Request | dict[str, Any], index: int = 0) -> Request:
    """Turn a dict (or Request) into a validated Request; errors name the request and the field."""
    where = f"request {index}"
    if isinstance(obj, Request):
        req = dataclasses.replace(obj)
    elif isinstance(obj, dict):
        unknown = sorted(set(obj) - _FIELDS)
        if unknown:
            raise RequestError(f"{where}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(_FIELDS))}")
        if "modality" not in obj:
            raise RequestError(f"{where}: 'modality' is required (one of {', '.join(MODALITIES)})")
        req = Request(**obj)
    else:
        raise RequestError(f"{where}: expected a dict or Request, got {type(obj).__name__}")
    _validate(req, where)
    return req


def _validate(r: Request, where: str) -> None:
    def bad(name: str, msg: str) -> RequestError:
        return RequestError(f"{where}: {name} {msg}", field=name, reason=msg)

    if r.modality not in MODALITIES:
        raise bad("modality", f"must be one of {', '.join(MODALITIES)}, got {r.modality!r}")
    if not isinstance(r.prompt, str):
        raise bad("prompt", f"must be a string, got {type(r.prompt).__name__}")
    if r.needs_image and r.image is None:
        raise bad("image", f"is required for {r.modality} (a PIL image or a path)")
    if not r.needs_image and r.image is not None:
        raise bad("image", f"is not used by {r.modality}; use img2text or img2img for an image input")
    for name in ("max_think_tokens", "max_tokens"):
        v = getattr(r, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(name, f"must be a positive integer, got {v!r}")
    if isinstance(r.steps, bool) or not isinstance(r.steps, int) or r.steps < 2:
        raise bad("steps", f"must be an integer >= 2 (steps - 1 model evaluations), got {r.steps!r}")
    v = r.text_temperature
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise bad("text_temperature", f"must be a number > 0, got {v!r}")
    if isinstance(r.top_k, bool) or not isinstance(r.top_k, int) or r.top_k < 0:
        raise bad("top_k", f"must be a non-negative integer (0 = off), got {r.top_k!r}")
    if isinstance(r.top_p, bool) or not isinstance(r.top_p, (int, float)) or not 0.0 < r.top_p <= 1.0:
        raise bad("top_p", f"must be a number in (0, 1], got {r.top_p!r}")
    for name in ("height", "width"):
        v = getattr(r, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 16):
            raise bad(name, f"must be a positive multiple of 16, got {v!r}")
    if r.seed is not None and (isinstance(r.seed, bool) or not isinstance(r.seed, int) or r.seed < 0):
        raise bad("seed", f"must be a non-negative integer, got {r.seed!r}")
    for name in ("cfg_text_scale", "cfg_img_scale", "timestep_shift"):
        v = getattr(r, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise bad(name, f"must be a positive number, got {v!r}")
    try:
        lo, hi = (float(x) for x in r.cfg_interval)
    except (TypeError, ValueError):
        raise bad("cfg_interval", f"must be two numbers [low, high], got {r.cfg_interval!r}") from None
    if not (0.0 <= lo <= hi <= 1.0):
        raise bad("cfg_interval", f"must satisfy 0 <= low <= high <= 1, got [{lo}, {hi}]")
    r.cfg_interval = (lo, hi)
    if r.cfg_renorm_type not in RENORM_TYPES:
        raise bad("cfg_renorm_type", f"must be one of {', '.join(RENORM_TYPES)}, got {r.cfg_renorm_type!r}")
    v = r.cfg_renorm_min
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise bad("cfg_renorm_min", f"must be a number in [0, 1], got {v!r}")
    if r.negative_prompt is not None and not isinstance(r.negative_prompt, str):
        raise bad("negative_prompt", "must be a string")
    if r.noise is not None and not isinstance(r.noise, torch.Tensor):
        raise bad("noise", f"must be a torch.Tensor of shape (tokens, latent dim), got {type(r.noise).__name__}")
