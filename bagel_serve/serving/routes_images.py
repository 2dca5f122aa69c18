"""POST /v1/images/generations (JSON), POST /v1/images/edits (multipart: `image` or `image[]`), and
GET /v1/images/{id} (images answered with `response_format=url`, kept for a while).

`stream: true` answers server-sent events: `image_generation.think_delta` (the plan, in think mode),
`image_generation.progress` after each denoising step, `image_generation.completed` with each image, then
`[DONE]`. Think mode's plan is each image's `revised_prompt` (SGLang's convention).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncGenerator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bagel_serve.serving.errors import APIError
from bagel_serve.serving.generation import Generation, sse_events, watch_disconnect
from bagel_serve.serving.media import decode_image, encode_image
from bagel_serve.serving.protocol import IMAGE_FIELDS, ImageRequest, check_prompt, coerce_form, image_fields, parse, read_json

router = APIRouter()


def _engine_requests(body: ImageRequest, image: Any, settings: Any) -> list[dict[str, Any]]:
    if not body.prompt:
        raise APIError(400, "prompt is required", param="prompt", code="invalid_value")
    check_prompt(body.prompt, "prompt")
    req: dict[str, Any] = {"modality": "img2img" if image is not None else "text2img", "prompt": body.prompt,
                           **image_fields(body, settings.max_pixels)}
    if body.temperature is not None and body.think:
        req.update(do_sample=body.temperature > 0, text_temperature=body.temperature)
    if image is not None:
        req["image"] = image
    reqs = []
    for i in range(body.n):
        r = dict(req)
        if body.seed is not None:
            r["seed"] = body.seed + i
        reqs.append(r)
    return reqs


def _datum(state: Any, body: ImageRequest, out: Any, think: str, request: Request) -> dict[str, Any]:
    data = encode_image(out.images[0], body.output_format, body.output_compression)
    if body.response_format == "url":
        key = state.images.put(data, body.output_format)
        item: dict[str, Any] = {"url": str(request.base_url).rstrip("/") + f"/v1/images/{key}"}
    else:
        import base64

        item = {"b64_json": base64.b64encode(data).decode("ascii")}
    if think:
        item["revised_prompt"] = think
    item["seed"] = out.seed
    return item


async def _answer(request: Request, body: ImageRequest, image: Any, endpoint: str) -> Any:
    state = request.app.state.bagel
    state.check_model(body.model)
    gen = Generation(state, endpoint, _engine_requests(body, image, state.settings), IMAGE_FIELDS,
                     tokens=bool(body.stream))
    created = int(time.time())
    if body.stream:
        return StreamingResponse(sse_events(gen, _stream(gen, body, created, state, request)),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    watcher = asyncio.create_task(watch_disconnect(request, gen))
    data: dict[int, dict[str, Any]] = {}
    try:
        async for up in gen.updates():
            if up.kind == "failed":
                raise up.error
            if up.kind == "done":
                data[up.index] = _datum(state, body, up.output, gen.final_text(up.index, up.output)[0], request)
                w, h = up.output.images[0].size
    finally:
        watcher.cancel()
    state.record(endpoint, gen.modality, 200, gen.t0)
    return JSONResponse({"created": created, "data": [data[i] for i in sorted(data)],
                         "output_format": body.output_format, "size": f"{w}x{h}"})


async def _stream(gen: Generation, body: ImageRequest, created: int, state: Any,
                  request: Request) -> AsyncGenerator[dict[str, Any] | APIError, None]:
    def event(kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": f"image_generation.{kind}", "created_at": created, **fields}

    async for up in gen.updates():
        if up.kind == "text" and up.think:
            yield event("think_delta", index=up.index, delta=up.think)
        elif up.kind == "progress":
            done, total = up.progress
            yield event("progress", index=up.index, step=done, total_steps=total)
        elif up.kind == "failed":
            yield up.error
        elif up.kind == "done":
            yield event("completed", index=up.index, output_format=body.output_format,
                        **_datum(state, body, up.output, gen.deltas[up.index].text[0], request))


@router.post("/v1/images/generations")
async def generations(request: Request) -> Any:
    body: ImageRequest = parse(ImageRequest, await read_json(request))
    return await _answer(request, body, None, "images_generations")


@router.post("/v1/images/edits")
async def edits(request: Request) -> Any:
    state = request.app.state.bagel
    limit = state.settings.max_upload_bytes
    try:
        form = await request.form(max_files=16, max_fields=64, max_part_size=limit)
    except APIError:
        raise
    except Exception as e:
        raise APIError(422, f"the body must be multipart/form-data with the image and fields ({type(e).__name__}: "
                            f"{e})", code="invalid_body") from None
    try:
        files = [v for k, v in form.multi_items() if k in ("image", "image[]") and not isinstance(v, str)]
        fields = {k: v for k, v in form.multi_items() if k not in ("image", "image[]", "mask")}
        if "mask" in form:
            raise APIError(400, "mask is not supported: BAGEL edits the whole image from the prompt", param="mask",
                           code="unsupported")
        if not files:
            raise APIError(400, "image is required (a file part named image or image[])", param="image",
                           code="invalid_value")
        if len(files) > 1:
            raise APIError(400, f"at most one image per edit is taken for now, got {len(files)}", param="image",
                           code="too_many_images")
        raw = await files[0].read()
    finally:
        await form.close()
    image = await asyncio.to_thread(decode_image, raw, "image", state.settings)
    body: ImageRequest = parse(ImageRequest, coerce_form(ImageRequest, fields))
    return await _answer(request, body, image, "images_edits")


@router.get("/v1/images/{image_id}")
async def stored_image(request: Request, image_id: str) -> Response:
    found = request.app.state.bagel.images.get(image_id)
    if found is None:
        raise APIError(404, f"no image {image_id!r} (images answered by URL are kept for a limited time)",
                       param="image_id", code="image_not_found")
    data, media_type = found
    return Response(content=data, media_type=media_type)
