"""POST /v1/chat/completions: text2text and img2text (text and image_url parts), text2img and img2img with
`modalities: ["image"]` (the image comes back as an image_url content part, vllm-omni's convention), think
mode (`think: true`; its text in `reasoning_content`), streaming as server-sent events.

Messages map onto one engine request's ordered input list (`inputs`): every text part and every image of
every message, in order, each its own segment of the context (the edit's output takes the last image's size).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncGenerator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bagel_serve.serving.errors import APIError
from bagel_serve.serving.generation import Generation, sse_events, watch_disconnect
from bagel_serve.serving.media import data_uri, encode_image, image_from_url
from bagel_serve.serving.protocol import (CHAT_FIELDS, ChatCompletionRequest, check_prompt, image_fields, parse,
                                         read_json)
from bagel_serve.serving.settings import MAX_IMAGES

router = APIRouter()
ENDPOINT = "chat"
ROLES = ("system", "user", "assistant", "developer")


async def _inputs(body: ChatCompletionRequest, settings: Any) -> list[Any]:
    """The messages' parts as the engine's ordered input list (`inputs`): every text part and every image, in
    message order, each its own segment, as the official interleaved inferencer takes them."""
    if not body.messages:
        raise APIError(400, "messages must hold at least one message", param="messages", code="invalid_value")
    parts: list[tuple[str, str]] = []  # ("text", text) or (where, url)
    for m, msg in enumerate(body.messages):
        where = f"messages[{m}]"
        if msg.get("role") not in ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {msg.get('role')!r}",
                           param="messages", code="invalid_value")
        content = msg.get("content")
        if isinstance(content, str):
            parts.append(("text", content))
            continue
        if not isinstance(content, list):
            raise APIError(400, f"{where}.content must be a string or a list of parts", param="messages",
                           code="invalid_value")
        for p, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(("text", part["text"]))
            elif kind == "image_url" and isinstance(part.get("image_url"), (dict, str)):
                url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
                parts.append((f"{where}.content[{p}].image_url.url", url))
            else:
                raise APIError(400, f"{where}.content[{p}] must be a text or image_url part", param="messages",
                               code="invalid_value")
    images = sum(kind != "text" for kind, _ in parts)
    if images > MAX_IMAGES:
        raise APIError(400, f"at most {MAX_IMAGES} images per request are taken, got {images}", param="messages",
                       code="too_many_images")
    check_prompt("\n".join(t for kind, t in parts if kind == "text" and t), "messages")
    items: list[Any] = []
    for kind, value in parts:
        if kind == "text":
            if value:
                items.append(value)
        else:
            items.append(await asyncio.to_thread(image_from_url, value, kind, settings))
    return items


def _engine_requests(body: ChatCompletionRequest, items: list[Any], settings: Any) -> list[dict[str, Any]]:
    wants_image = "image" in (body.modalities or [])
    has_image = any(not isinstance(x, str) for x in items)
    if body.modalities is not None and not set(body.modalities) <= {"text", "image"}:
        raise APIError(400, f"modalities must hold 'text' and/or 'image', got {body.modalities}", param="modalities",
                       code="invalid_value")
    if wants_image:
        req: dict[str, Any] = {"modality": "img2img" if has_image else "text2img", "inputs": items,
                               **image_fields(body, settings.max_pixels)}
        if body.temperature is not None and body.think:
            req.update(do_sample=body.temperature > 0, text_temperature=body.temperature)
    else:
        req = {"modality": "img2text" if has_image else "text2text", "inputs": items}
        for name, value in (("max_tokens", body.max_completion_tokens or body.max_tokens), ("top_p", body.top_p),
                            ("top_k", body.top_k), ("seed", body.seed), ("think", body.think),
                            ("repetition_penalty", body.repetition_penalty), ("max_think_tokens", body.max_think_tokens)):
            if value is not None:
                req[name] = value
        if body.temperature is not None:
            req.update(do_sample=body.temperature > 0, text_temperature=body.temperature)
    reqs = []
    for i in range(body.n):
        r = dict(req)
        if body.seed is not None:
            r["seed"] = body.seed + i
        reqs.append(r)
    return reqs


def _image_part(out: Any, body: ChatCompletionRequest) -> dict[str, Any]:
    data = encode_image(out.images[0], body.output_format, body.output_compression)
    return {"type": "image_url", "image_url": {"url": data_uri(data, body.output_format)}}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    state = request.app.state.bagel
    body: ChatCompletionRequest = parse(ChatCompletionRequest, await read_json(request))
    state.check_model(body.model)
    items = await _inputs(body, state.settings)
    stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    gen = Generation(state, ENDPOINT, _engine_requests(body, items, state.settings), CHAT_FIELDS, stop=stops,
                     tokens=bool(body.stream))
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        return StreamingResponse(sse_events(gen, _stream(gen, body, rid, created, state)),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    watcher = asyncio.create_task(watch_disconnect(request, gen))
    try:
        choices: dict[int, dict[str, Any]] = {}
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        async for up in gen.updates():
            if up.kind == "failed":
                raise up.error
            if up.kind != "done":
                continue
            out = up.output
            think, answer = gen.final_text(up.index, out)
            message: dict[str, Any] = {"role": "assistant", "content": answer}
            if out.images:
                message["content"] = [_image_part(out, body)]
            if think:
                message["reasoning_content"] = think
            choices[up.index] = {"index": up.index, "message": message, "finish_reason": up.finish_reason,
                                 "logprobs": None}
            usage["prompt_tokens"] += gen.prompt_tokens(up.index)
            usage["completion_tokens"] += len(out.token_ids)
    finally:
        watcher.cancel()
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    state.record(ENDPOINT, gen.modality, 200, gen.t0)
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": state.settings.served_model_name,
                         "choices": [choices[i] for i in sorted(choices)], "usage": usage})


async def _stream(gen: Generation, body: ChatCompletionRequest, rid: str, created: int,
                  state: Any) -> AsyncGenerator[dict[str, Any] | APIError, None]:
    model = state.settings.served_model_name

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
                **extra}

    completion = prompt = 0
    for i in range(body.n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    async for up in gen.updates():
        i = up.index
        if up.kind == "text":
            delta: dict[str, Any] = {}
            if up.think:
                delta["reasoning_content"] = up.think
            if up.answer:
                delta["content"] = up.answer
            yield chunk([{"index": i, "delta": delta, "finish_reason": None}])
        elif up.kind == "failed":
            yield up.error
        elif up.kind == "done":
            out = up.output
            if out.images:
                yield chunk([{"index": i, "delta": {"content": [_image_part(out, body)]}, "finish_reason": None}])
            completion += len(out.token_ids)
            prompt += gen.prompt_tokens(i)
            yield chunk([{"index": i, "delta": {}, "finish_reason": up.finish_reason}])
    if (body.stream_options or {}).get("include_usage"):
        yield chunk([], usage={"prompt_tokens": prompt, "completion_tokens": completion,
                               "total_tokens": prompt + completion})
