"""Request bodies of the HTTP API, declared as dataclasses and checked by the one validator
(`config.validate`): a bad field is a 400 naming it (`param`), as the engine's own request check is
(`engine.request.make_request`, whose field names are mapped back to the API's: `steps` is
`num_inference_steps`, `text_temperature` is `temperature`, ...).

Field names follow OpenAI's Chat Completions and Images APIs; BAGEL's own controls (think mode, CFG,
schedule) are extra fields at the top level, which is where the `openai` client's `extra_body` puts them.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from bagel_serve.config.sampling import MAX_STEPS, MAX_TOKENS_LIMIT, RENORM_TYPES, SEED_MAX
from bagel_serve.config.validate import ValidationError, build, opt, type_hints
from bagel_serve.serving.errors import APIError, bad_field
from bagel_serve.serving.settings import MAX_N, MAX_PROMPT_CHARS

OUTPUT_FORMATS = ("png", "jpeg", "webp")
RESPONSE_FORMATS = ("b64_json", "url")

# Engine request field -> the API's name for it (for errors).
CHAT_FIELDS = {"text_temperature": "temperature", "steps": "num_inference_steps", "height": "size", "width": "size",
               "image": "messages", "prompt": "messages", "do_sample": "temperature"}
IMAGE_FIELDS = {"steps": "num_inference_steps", "height": "size", "width": "size", "text_temperature": "temperature"}


@dataclass
class ImageControls:
    """BAGEL's image controls, shared by chat (image output) and the Images endpoints."""

    size: str | None = None
    """"WxH" (multiples of 16) or "auto"."""
    num_inference_steps: int | None = opt(None, ge=2, le=MAX_STEPS)
    negative_prompt: str | None = None
    cfg_text_scale: float | None = opt(None, gt=0.0)
    cfg_img_scale: float | None = opt(None, gt=0.0)
    cfg_interval: tuple[float, float] | None = None
    cfg_renorm_type: str | None = opt(None, choices=RENORM_TYPES)
    cfg_renorm_min: float | None = opt(None, ge=0.0, le=1.0)
    timestep_shift: float | None = opt(None, gt=0.0)
    enable_taylorseer: bool | None = None
    think: bool | None = None
    max_think_tokens: int | None = opt(None, ge=1, le=MAX_TOKENS_LIMIT)
    seed: int | None = opt(None, ge=0, le=SEED_MAX)
    output_format: str = opt("png", choices=OUTPUT_FORMATS)
    output_compression: int | None = opt(None, ge=0, le=100)


@dataclass
class ChatCompletionRequest(ImageControls):
    messages: list[dict[str, Any]] = opt(factory=list)
    model: str | None = None
    max_tokens: int | None = opt(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = opt(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = opt(None, ge=0.0, le=2.0)
    top_p: float | None = opt(None, gt=0.0, le=1.0)
    top_k: int | None = opt(None, ge=0)
    repetition_penalty: float | None = opt(None, gt=0.0)
    stop: str | list[str] | None = None
    n: int = opt(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    modalities: list[str] | None = None
    user: str | None = None


@dataclass
class ImageRequest(ImageControls):
    """/v1/images/generations (JSON) and /v1/images/edits (multipart, with the images apart)."""

    prompt: str = ""
    model: str | None = None
    n: int = opt(1, ge=1, le=MAX_N)
    response_format: str = opt("b64_json", choices=RESPONSE_FORMATS)
    stream: bool = False
    user: str | None = None
    temperature: float | None = opt(None, ge=0.0, le=2.0)
    """Sampling temperature of the think plan (think mode); 0 or absent: greedy."""


def parse(cls: type, data: Any) -> Any:
    """A request body as `cls`, or a 400 naming the bad field."""
    if not isinstance(data, Mapping):
        raise APIError(422, "the request body must be a JSON object", code="invalid_body")
    try:
        return build(cls, data, style="yaml")
    except ValidationError as e:
        param = e.path.split(".")[0].split("[")[0] if e.path else None
        raise APIError(400, str(e), param=param or None, code="invalid_value") from None


def coerce_form(cls: type, form: Mapping[str, str]) -> dict[str, Any]:
    """Multipart form fields (strings) as the JSON values `cls`'s fields take: numbers, true/false, and
    `cfg_interval` as "low,high" or a JSON list."""
    import json

    hints = type_hints(cls)
    out: dict[str, Any] = {}
    for key, raw in form.items():
        tp = hints.get(key)
        if tp is None or not isinstance(raw, str):
            out[key] = raw
            continue
        kinds = set(typing.get_args(tp)) or {tp}
        text = raw.strip()
        try:
            if int in kinds:
                out[key] = int(text)
            elif float in kinds:
                out[key] = float(text)
            elif bool in kinds:
                out[key] = {"true": True, "false": False}.get(text.lower(), raw)
            elif key == "cfg_interval":
                out[key] = json.loads(text) if text.startswith("[") else [float(x) for x in text.split(",")]
            else:
                out[key] = raw
        except ValueError:
            out[key] = raw  # left as a string: the validator names the field and what it takes
    return out


def parse_size(size: str | None, max_pixels: int) -> tuple[int | None, int | None]:
    """(width, height) of a "WxH" size; (None, None) for None or "auto" (the engine's default)."""
    if size is None or size == "auto":
        return None, None
    parts = size.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise bad_field("size", f"size must be 'WIDTHxHEIGHT' (e.g. '1024x1024') or 'auto', got {size!r}")
    w, h = int(parts[0]), int(parts[1])
    if w * h > max_pixels:
        raise APIError(400, f"size {size} has {w * h} pixels, more than this server's --max-pixels {max_pixels}",
                       param="size", code="too_large")
    return w, h


def check_prompt(text: str, param: str) -> None:
    if len(text) > MAX_PROMPT_CHARS:
        raise APIError(400, f"{param} holds {len(text)} characters; at most {MAX_PROMPT_CHARS} are taken",
                       param=param, code="too_long")


def image_fields(c: ImageControls, max_pixels: int) -> dict[str, Any]:
    """The engine request fields of the image controls that were given."""
    width, height = parse_size(c.size, max_pixels)
    fields = {"width": width, "height": height, "steps": c.num_inference_steps, "negative_prompt": c.negative_prompt,
              "cfg_text_scale": c.cfg_text_scale, "cfg_img_scale": c.cfg_img_scale,
              "cfg_interval": tuple(c.cfg_interval) if c.cfg_interval is not None else None,
              "cfg_renorm_type": c.cfg_renorm_type, "cfg_renorm_min": c.cfg_renorm_min,
              "timestep_shift": c.timestep_shift, "enable_taylorseer": c.enable_taylorseer,
              "think": c.think, "max_think_tokens": c.max_think_tokens, "seed": c.seed}
    return {k: v for k, v in fields.items() if v is not None}


def given(obj: Any, *names: str) -> bool:
    """Whether any of these fields differs from its declared default (was sent)."""
    defaults = {f.name: f.default for f in dataclasses.fields(obj)}
    return any(getattr(obj, n) != defaults.get(n) for n in names)


async def read_json(request: Any) -> Any:
    """A request's JSON body; 422 when it is not JSON."""
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError):
        raise APIError(422, "the request body is not valid JSON", code="invalid_json") from None
