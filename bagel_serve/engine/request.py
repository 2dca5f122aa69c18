"""Requests and outputs of the engine: the one place a request's fields, bounds and defaults are declared,
and where they are validated (by the one validator, `config.validate`).

Defaults. A field declared with default None is "not given" until `make_request` resolves it, highest
first: the request's own value > the caller's defaults (`Omni` passes stage 0's `default_sampling_params`
of the deploy config; a CLI flag that was given is part of the request) > the built-in default declared
here (`builtin=`). So a `Request` object's fields left at their declared default count as not given, exactly
like keys missing from a dict. `max_tokens` not given anywhere is `max_think_tokens` (one budget, as in the
official inferencer). `text_temperature=0` means greedy (as in vLLM): it turns `do_sample` off.

Token counts follow the OpenAI convention: `max_tokens` and `max_think_tokens` are the most *generated*
tokens (the official `max_think_token_n=n` is our `n - 1`).

Inputs. A request holds either `prompt` (+ `image`) or `inputs`, an ordered list of text segments (`str`) and
images (a PIL image or an `os.PathLike` path: a `str` is always text), laid out in that order as the official
`interleave_inference` lays out its input list. `prompt` and `image` are the one-text (one-image) special case:
`Request.items` is the ordered list either way (`[image, prompt]`, as the reference's cases order them), and
it is all that the engine reads.

Fields given for a modality that does not use them (`steps` for a text output, `max_tokens` for an image
output, `text_temperature` while decoding greedily, ...) are warned about (`RequestWarning`), never
silently dropped.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from PIL import Image

from bagel_serve.config.sampling import MAX_STEPS, MAX_TOKENS_LIMIT, RENORM_TYPES, SEED_MAX, SamplingParams
from bagel_serve.config.validate import ValidationError, check_field, opt, short

MODALITIES = ("text2text", "img2text", "text2img", "img2img")


class RequestError(ValueError):
    """A request field is missing or out of range; the message names the request and the field.

    `field` and `reason` carry the same facts apart, so the CLI can name its flag instead.
    """

    def __init__(self, message: str, field: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason


class RequestWarning(UserWarning):
    """A request field was given that its modality (or decoding mode) does not use; it is ignored.
    `field` and `reason` as in RequestError."""

    def __init__(self, message: str, field: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason


InputItem = typing.Union[str, Image.Image, os.PathLike]
"""One item of a request's input list: a text segment (str) or an image (PIL image or path)."""


@dataclass
class Request:
    """One generation request. Built-in defaults follow the official inferencer's `gen_image` / app; a field
    whose default is None is "not given" until `make_request` resolves it (see the module docstring)."""

    modality: str = opt(choices=MODALITIES)
    prompt: str = ""
    image: Image.Image | str | os.PathLike | None = None
    """A PIL image or a path (img2text, img2img)."""
    inputs: list[InputItem] | None = None
    """Instead of prompt/image: text segments (str) and images (PIL image or os.PathLike path), in order."""
    think: bool | None = opt(None, builtin=False)
    max_think_tokens: int | None = opt(None, builtin=1000, ge=1, le=MAX_TOKENS_LIMIT)
    """Most generated tokens of the think plan (image outputs); the text budget when max_tokens is not given."""
    max_tokens: int | None = opt(None, ge=1, le=MAX_TOKENS_LIMIT)
    """Most generated tokens of a text answer, think included; default: max_think_tokens."""
    do_sample: bool | None = opt(None, builtin=False)
    text_temperature: float | None = opt(None, builtin=0.3, ge=0.0)
    """Sampling temperature; 0 = greedy (turns do_sample off)."""
    top_k: int | None = opt(None, builtin=0, ge=0)
    top_p: float | None = opt(None, builtin=1.0, gt=0.0, le=1.0)
    repetition_penalty: float | None = opt(None, builtin=1.0, gt=0.0)
    height: int | None = opt(None, ge=16, multiple_of=16)
    width: int | None = opt(None, ge=16, multiple_of=16)
    steps: int | None = opt(None, builtin=50, ge=2, le=MAX_STEPS)
    seed: int | None = opt(None, ge=0, le=SEED_MAX)
    cfg_text_scale: float | None = opt(None, builtin=4.0, gt=0.0)
    cfg_img_scale: float | None = opt(None, builtin=1.5, gt=0.0)
    cfg_interval: tuple[float, float] | None = opt(None, builtin=(0.4, 1.0))
    cfg_renorm_type: str | None = opt(None, builtin="global", choices=RENORM_TYPES)
    cfg_renorm_min: float | None = opt(None, builtin=0.0, ge=0.0, le=1.0)
    timestep_shift: float | None = opt(None, builtin=3.0, gt=0.0)
    negative_prompt: str | None = None
    return_latents: bool | None = opt(None, builtin=False)
    noise: torch.Tensor | None = None
    enable_taylorseer: bool | None = opt(None, builtin=False)
    """TaylorSeer step caching (`engine.step_cache`): predict most denoising steps of each CFG branch from
    its last full forwards instead of running the transformer; faster, not the exact image."""

    @property
    def outputs_image(self) -> bool:
        return self.modality in ("text2img", "img2img")

    @property
    def needs_image(self) -> bool:
        return self.modality in ("img2text", "img2img")

    @property
    def items(self) -> list[InputItem]:
        """The ordered input list the context is built from: `inputs`, else `[image, prompt]` / `[prompt]`
        (an `image` given as a str is a path: here it becomes a `pathlib.Path`, since a str item is text)."""
        if self.inputs is not None:
            return list(self.inputs)
        if self.image is None:
            return [self.prompt]
        return [pathlib.Path(self.image) if isinstance(self.image, str) else self.image, self.prompt]

    @property
    def texts(self) -> list[str]:
        """The text segments of `items`, in order."""
        return [x for x in self.items if isinstance(x, str)]


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


_SPECS = {f.name: f for f in dataclasses.fields(Request)}
_HINTS = typing.get_type_hints(Request)
_FIELDS = set(_SPECS)
# Fields only image outputs use.
IMAGE_ONLY_FIELDS = ("negative_prompt", "steps", "height", "width", "cfg_text_scale", "cfg_img_scale", "cfg_interval",
                     "cfg_renorm_type", "cfg_renorm_min", "timestep_shift", "return_latents", "noise",
                     "enable_taylorseer")
# Fields that shape text decoding (an image output decodes only with think).
DECODING_FIELDS = ("max_think_tokens", "do_sample", "text_temperature", "top_k", "top_p", "repetition_penalty")


def request_defaults(params: SamplingParams | Mapping[str, Any] | None) -> dict[str, Any]:
    """Request defaults from a stage's `default_sampling_params`: `temperature` sets `text_temperature` and
    `do_sample = temperature > 0`; `top_p`, `top_k`, `max_tokens`, `seed`, `repetition_penalty`,
    `enable_taylorseer` keep their names (`detokenize` is what always happens)."""
    if params is None:
        return {}
    if not isinstance(params, SamplingParams):
        from bagel_serve.config.validate import build

        params = build(SamplingParams, params, "default_sampling_params")
    out: dict[str, Any] = {}
    if params.temperature is not None:
        out["text_temperature"] = params.temperature
        out["do_sample"] = params.temperature > 0
    for name in ("top_p", "top_k", "max_tokens", "seed", "repetition_penalty", "enable_taylorseer"):
        value = getattr(params, name)
        if value is not None:
            out[name] = value
    return out


def make_request(obj: Request | dict[str, Any], index: int = 0, defaults: Mapping[str, Any] | None = None) -> Request:
    """Turn a dict (or Request) into a validated Request with every default resolved; errors name the
    request and the field (`RequestError`), fields its modality does not use are warned about
    (`RequestWarning`). `defaults` (field -> value) sit between the request's own values and the built-in
    defaults. A Request this function returned is only checked again (no defaults, no warnings)."""
    where = f"request {index}"
    if isinstance(obj, Request):
        if getattr(obj, "_resolved", False):
            return _recheck(obj, where)
        given = {name: getattr(obj, name) for name in _SPECS
                 if name in ("modality", "prompt") or getattr(obj, name) is not None}
    elif isinstance(obj, dict):
        unknown = sorted(set(obj) - _FIELDS)
        if unknown:
            raise RequestError(f"{where}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(_FIELDS))}")
        if "modality" not in obj:
            raise RequestError(f"{where}: 'modality' is required (one of {', '.join(MODALITIES)})")
        given = {k: v for k, v in obj.items() if v is not None or k == "modality"}
    else:
        raise RequestError(f"{where}: expected a dict or Request, got {type(obj).__name__}")
    values = {name: _check(name, value, where) for name, value in given.items()}
    for name, value in (defaults or {}).items():
        if name not in _SPECS:
            raise RequestError(f"{where}: unknown default {name!r}; known fields: {', '.join(sorted(_FIELDS))}")
        if name not in values and value is not None:
            values[name] = _check(name, value, where, " (default)")
    for name, spec in _SPECS.items():
        if name not in values and spec.metadata.get("builtin", dataclasses.MISSING) is not dataclasses.MISSING:
            values[name] = spec.metadata["builtin"]
    values.setdefault("max_tokens", values["max_think_tokens"])
    if values["text_temperature"] == 0.0:
        values["do_sample"] = False  # temperature 0 means greedy
    req = Request(**values)
    _check_request(req, where)
    for name, reason in _unused(req, given):
        warnings.warn(RequestWarning(f"{where}: {name} {reason}; ignored", field=name, reason=reason), stacklevel=2)
    req._resolved = True
    return req


_REASONS = {"cfg_interval": "must be two finite numbers [low, high]", "image": "must be a PIL image or a path",
            "noise": "must be a torch.Tensor of shape (tokens, latent dim)",
            "inputs": "must be a list of text segments (str) and images (PIL images or pathlib.Path paths)"}
_ITEM_REASON = "must be a text segment (str) or an image (a PIL image or a pathlib.Path path)"


def _check(name: str, value: Any, where: str, what: str = "") -> Any:
    try:
        out = check_field(_SPECS[name], _HINTS[name], value, name, style="python", given=True)
    except ValidationError as e:
        reason = e.reason if e.path == name else f"{e.path[len(name):]} {e.reason}"
        if name == "inputs" and e.path != name:  # one item is wrong: name it by its index
            item = e.path[len(name):]
            reason = f"{item} {_ITEM_REASON}, got {short(value[int(item[1:-1])])}"
            raise RequestError(f"{where}: {name}{item}{what} {reason[len(item) + 1:]}", field=name,
                               reason=reason) from None
        if name in _REASONS:  # a plainer word for what these fields take than their type hints give
            reason = f"{_REASONS[name]}, got {short(value)}"
        raise RequestError(f"{where}: {name}{what} {reason}", field=name, reason=reason) from None
    return out


def _bad(where: str, name: str, reason: str) -> RequestError:
    return RequestError(f"{where}: {name} {reason}", field=name, reason=reason)


def _check_request(r: Request, where: str) -> None:
    """Rules across fields (each field's type and range are already checked)."""
    if r.inputs is not None:
        _check_inputs(r, where)
    elif r.needs_image and r.image is None:
        raise _bad(where, "image", f"is required for {r.modality} (a PIL image or a path)")
    elif not r.needs_image and r.image is not None:
        raise _bad(where, "image", f"is not used by {r.modality}; use img2text or img2img for an image input")
    lo, hi = r.cfg_interval
    if not (0.0 <= lo <= hi <= 1.0):
        raise _bad(where, "cfg_interval", f"must satisfy 0 <= low <= high <= 1, got [{lo}, {hi}]")
    if r.noise is not None:
        n = r.noise
        if n.dim() != 2 or not n.is_floating_point():
            raise _bad(where, "noise", f"must be a 2-D floating-point tensor (tokens, latent dim), "
                                       f"got {n.dim()}-D {str(n.dtype).replace('torch.', '')}")
        if n.device.type != "meta" and not bool(torch.isfinite(n).all()):  # a meta tensor has no values to check
            raise _bad(where, "noise", "must be finite (it holds NaN or inf values)")


def _check_inputs(r: Request, where: str) -> None:
    """`inputs` replaces prompt and image; it holds at least one item, and images exactly where the
    modality reads them (an image-input modality at least one; the others none)."""
    given = [name for name, v in (("prompt", r.prompt != ""), ("image", r.image is not None)) if v]
    if given:
        raise _bad(where, "inputs", f"replaces prompt and image; give either inputs or {' and '.join(given)}, "
                                    f"not both")
    if not r.inputs:
        raise _bad(where, "inputs", "must hold at least one item (a text segment or an image)")
    images = sum(not isinstance(x, str) for x in r.inputs)
    if r.needs_image and images == 0:
        raise _bad(where, "inputs", f"must hold at least one image for {r.modality} (a str item is text)")
    if not r.needs_image and images:
        raise _bad(where, "inputs", f"holds {images} image(s), which {r.modality} does not use; use img2text "
                                    f"or img2img for image inputs")


def _recheck(obj: Request, where: str) -> Request:
    """A resolved Request again (it may have been changed since): every field's type and range."""
    values = {}
    for name in _SPECS:
        value = getattr(obj, name)
        values[name] = value if value is None else _check(name, value, where)
    req = Request(**values)
    _check_request(req, where)
    req._resolved = True
    return req


def _unused(r: Request, given: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, why it is ignored) for each field that was given but does nothing for this request."""
    m = r.modality
    out: list[tuple[str, str]] = []
    if not r.outputs_image:
        out += [(n, f"is not used by {m} (a text output)") for n in IMAGE_ONLY_FIELDS if n in given]
        if "max_think_tokens" in given and "max_tokens" in given:
            out.append(("max_think_tokens", f"is not used by {m} when max_tokens is given (max_tokens bounds the "
                                            f"whole answer, think included)"))
    else:
        if "max_tokens" in given:
            out.append(("max_tokens", f"is not used by {m} (an image output; max_think_tokens bounds its think plan)"))
        if not r.think:
            out += [(n, f"is only used by {m} with think=True (it shapes the decoding of the plan)")
                    for n in DECODING_FIELDS if n in given]
    if (not r.outputs_image or r.think) and not r.do_sample:
        for n in ("text_temperature", "top_k", "top_p"):
            if n in given and not (n == "text_temperature" and r.text_temperature == 0.0):
                out.append((n, "has no effect with greedy decoding (do_sample=False)"))
        if not r.outputs_image and "seed" in given:
            out.append(("seed", f"has no effect: {m} decodes greedily (do_sample=False)"))
    return out
