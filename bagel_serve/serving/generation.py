"""One HTTP request's engine requests (its `n` choices or images), as a stream of updates for the routes:
text deltas (think and answer apart), denoising progress, each request's end; stop strings applied; the
requests cancelled when the client goes away (`watch_disconnect`) or the route stops reading. `sse_events`
is the end of every streamed answer: the events as server-sent events, errors in the stream, `[DONE]`, and
the request's status in the metrics."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, AsyncGenerator, AsyncIterator

from bagel_serve.engine.detokenize import TextDeltas, split_think
from bagel_serve.engine.request import RequestOutput
from bagel_serve.serving.errors import APIError, from_exception


@dataclass
class Update:
    kind: str
    """"text" (think, answer deltas), "progress" ((done, total)), "done" (output, finish_reason), "failed"
    (an APIError)."""
    index: int
    think: str = ""
    answer: str = ""
    progress: tuple[int, int] | None = None
    output: RequestOutput | None = None
    finish_reason: str | None = None
    error: APIError | None = None


class Generation:
    """Submit `requests` (engine request dicts) to the app's engine; iterate `updates()`."""

    def __init__(self, state: Any, endpoint: str, requests: list[dict[str, Any]], fields: dict[str, str], *,
                 stop: list[str] | None = None, tokens: bool = True) -> None:
        """`tokens`: deliver each token as it is made (a streamed answer, or stop strings to watch for);
        without, only the finished outputs come, and the engine sends nothing per token (at 64 concurrent
        requests, per-token events and their decoding in this process halve the engine's throughput)."""
        self.state = state
        self.endpoint = endpoint
        self.fields = fields
        self.stop = [s for s in (stop or []) if s]
        self.tokens = tokens or bool(self.stop)
        self.t0 = time.perf_counter()
        self.first_token_s: float | None = None
        try:
            self.stream = state.omni.stream(requests, progress=True, timeout=state.settings.request_timeout,
                                            tokens=self.tokens)
        except Exception as e:
            raise from_exception(e, fields) from None
        self.requests = self.stream.submission.requests
        self.modality = self.requests[0].modality if self.requests else "text2text"
        tok = state.omni.tokenizer
        self.deltas = [TextDeltas(tok.decode_generation, think=bool(r.think), outputs_image=r.outputs_image)
                       for r in self.requests]
        self._stopped: set[int] = set()

    def prompt_tokens(self, index: int) -> int:
        return len(self.stream.submission.prepared[index].text_ids)

    def final_text(self, index: int, out: RequestOutput) -> tuple[str, str]:
        """(think text, answer text) of a finished request, as its stream delivered them (stop strings cut)."""
        if index in self._stopped:
            return out.think_text or "", out.text
        req = self.requests[index]
        return split_think(out.text if not req.outputs_image else out.think_text or "", bool(req.think), req.outputs_image)

    def cancel(self) -> None:
        self.stream.close()

    async def updates(self) -> AsyncIterator[Update]:
        metrics = self.state.metrics
        try:
            async for ev in self.stream:
                i = ev.index
                if ev.kind == "fatal":
                    raise from_exception(ev.data)
                if i in self._stopped:
                    if ev.kind in ("output", "error"):
                        yield Update("done", i, output=self._stopped_output(i), finish_reason="stop")
                    continue
                if ev.kind == "token":
                    if self.first_token_s is None:
                        self.first_token_s = time.perf_counter() - self.t0
                        metrics.ttft.labels(self.endpoint).observe(self.first_token_s)
                    metrics.count_tokens(1)
                    think, answer = self.deltas[i].push(ev.data)
                    answer, hit = self._apply_stop(i, answer)
                    if think or answer:
                        yield Update("text", i, think=think, answer=answer)
                    if hit:
                        self._stopped.add(i)
                        self.stream.cancel(i)
                elif ev.kind == "progress":
                    metrics.denoise_steps.inc()
                    yield Update("progress", i, progress=tuple(ev.data))
                elif ev.kind == "error":
                    yield Update("failed", i, error=from_exception(ev.data, self.fields))
                elif ev.kind == "output":
                    out: RequestOutput = ev.data
                    if not out.ok:
                        yield Update("failed", i, error=from_exception(out.error, self.fields))
                        continue
                    if not self.tokens:
                        metrics.count_tokens(len(out.token_ids))
                    think, answer = self.deltas[i].finish()
                    answer, _ = self._apply_stop(i, answer)
                    if think or answer:
                        yield Update("text", i, think=think, answer=answer)
                    metrics.images.inc(len(out.images))
                    req = self.requests[i]
                    limit = req.max_think_tokens if req.outputs_image else req.max_tokens
                    finish = "length" if len(out.token_ids) >= limit and not req.outputs_image else "stop"
                    yield Update("done", i, output=out, finish_reason=finish)
        finally:
            self.stream.close()

    def _apply_stop(self, i: int, delta: str) -> tuple[str, bool]:
        """The part of an answer delta before the first stop string, and whether one was hit. (The delta
        that completes a stop string is cut where the string starts.)"""
        if not self.stop or not delta:
            return delta, False
        sent = self.deltas[i].text[1]
        before = sent[: len(sent) - len(delta)]
        for s in self.stop:
            at = sent.find(s, max(0, len(before) - len(s) + 1))
            if at >= 0:
                return sent[len(before):at] if at >= len(before) else "", True
        return delta, False

    def _stopped_output(self, i: int) -> RequestOutput:
        req = self.requests[i]
        think, answer = self.deltas[i].text
        text = answer
        for s in self.stop:
            if s in text:
                text = text[: text.find(s)]
        return RequestOutput(request_index=i, modality=req.modality, text=text, token_ids=list(self.deltas[i].ids),
                             think_text=think or None, seed=req.seed)


async def watch_disconnect(request: Any, generation: Generation, poll_s: float = 0.1) -> None:
    """Cancel the generation when the HTTP client disconnects (for responses sent in one piece)."""
    while True:
        if await request.is_disconnected():
            generation.cancel()
            return
        await asyncio.sleep(poll_s)


SSE_DONE = "data: [DONE]\n\n"


def sse_data(payload: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON object."""
    return "data: " + json.dumps(payload) + "\n\n"


async def sse_events(generation: Generation,
                     events: AsyncGenerator[dict[str, Any] | APIError, None]) -> AsyncIterator[str]:
    """A route's events as server-sent events, then `[DONE]`. An `APIError` among the events (one request of
    several failed) is sent as its error body and the stream goes on; one raised ends the stream with its
    body. Streams answer 200 before they know how they end, so the status recorded in the metrics is the
    first error's, else 200 when the stream ran to its end, else 499 (the client left first). The engine
    requests are cancelled, and `events` closed, however the stream ends."""
    status: int | None = None
    try:
        async for ev in events:
            if isinstance(ev, APIError):
                status = status or ev.status
                ev = ev.body()
            yield sse_data(ev)
        status = status or 200
        yield SSE_DONE
    except APIError as e:
        status = e.status
        yield sse_data(e.body())
        yield SSE_DONE
    finally:
        generation.cancel()
        generation.state.record(generation.endpoint, generation.modality, status or 499, generation.t0)
        await events.aclose()
