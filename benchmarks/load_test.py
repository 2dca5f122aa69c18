"""Load on a running bagel-serve server through HTTP: N mixed requests (text2text, img2text with a small
data: URI image, text2img, img2img; chat and the images endpoints; streaming and not) at a given
concurrency, some cancelled mid-way by closing the connection. Every answer is checked for OpenAI's shape;
p50/p99 latency per modality is printed. Exit status 1 when a request was lost, hung or malformed.

    bagel-serve serve bagel-serve-demo --deploy-config bagel_single_stage.yaml --port 8000 &
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --requests 500 --concurrency 32

The plan is fixed by `--seed` (which request is which kind, streamed, cancelled). Requests to be cancelled
ask for long work (many tokens or steps) so that they are still running when their connection closes.
tests/test_server_load.py runs it against a server in the test process (CPU, the tiny checkpoint).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx
from PIL import Image

KINDS = ("text2text", "img2text", "text2img", "img2img")
SIZE = 32


@dataclass
class Planned:
    index: int
    kind: str
    endpoint: str  # "chat", "generations" or "edits"
    stream: bool
    cancel: bool


@dataclass
class Outcome:
    planned: Planned
    ok: bool = False
    """A well-formed 200 answer read to its end, or (cancelled ones) a connection closed mid-way."""
    status: int | None = None
    problem: str | None = None
    latency_s: float = 0.0


@dataclass
class Report:
    outcomes: list[Outcome]
    wall_s: float
    requests: int

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def lost(self) -> int:
        """Planned requests with no outcome at all (hung past the deadline)."""
        return self.requests - len(self.outcomes)

    def latencies(self, kind: str | None = None) -> list[float]:
        return sorted(o.latency_s for o in self.outcomes
                      if o.ok and not o.planned.cancel and (kind is None or o.planned.kind == kind))

    def summary(self) -> str:
        lines = [f"{self.requests} requests in {self.wall_s:.1f} s ({self.requests / self.wall_s:.1f} req/s): "
                 f"{sum(o.ok for o in self.outcomes)} ok ({sum(o.ok and o.planned.cancel for o in self.outcomes)} "
                 f"cancelled mid-way), {len(self.failures)} failed, {self.lost} lost"]
        for kind in (None, *KINDS):
            lat = self.latencies(kind)
            if lat:
                lines.append(f"  {kind or 'all':9s} n={len(lat):4d}  p50 {percentile(lat, 50) * 1e3:8.1f} ms  "
                             f"p99 {percentile(lat, 99) * 1e3:8.1f} ms")
        for o in self.failures[:10]:
            lines.append(f"  FAILED #{o.planned.index} {o.planned}: status {o.status}: {o.problem}")
        return "\n".join(lines)


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of sorted values."""
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def plan(requests: int, seed: int, cancel_fraction: float) -> list[Planned]:
    rng = random.Random(seed)
    out = []
    for i in range(requests):
        kind = KINDS[i % len(KINDS)]
        endpoint = {"text2img": rng.choice(["chat", "generations"]),
                    "img2img": rng.choice(["chat", "edits"])}.get(kind, "chat")
        cancel = rng.random() < cancel_fraction
        out.append(Planned(i, kind, endpoint, stream=cancel or rng.random() < 0.5, cancel=cancel))
    return out


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (180, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


class Driver:
    def __init__(self, url: str, *, api_key: str | None, model: str | None, max_tokens: int, steps: int,
                 timeout: float) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.max_tokens = max_tokens
        self.steps = steps
        self.timeout = timeout
        self.png = _png()
        self.data_uri = "data:image/png;base64," + base64.b64encode(self.png).decode()

    def request(self, p: Planned) -> dict[str, Any]:
        """httpx.stream keyword arguments of a planned request."""
        tokens = 256 if p.cancel else self.max_tokens
        steps = 50 if p.cancel else self.steps
        image = {"size": f"{SIZE}x{SIZE}", "num_inference_steps": steps, "seed": p.index}
        model = {"model": self.model} if self.model else {}
        if p.endpoint == "generations":
            return {"url": "/v1/images/generations",
                    "json": {"prompt": f"a cat #{p.index}", "stream": p.stream, **image, **model}}
        if p.endpoint == "edits":
            fields = {"prompt": f"make it blue #{p.index}", "stream": str(p.stream).lower(), **model,
                      **{k: str(v) for k, v in image.items()}}
            return {"url": "/v1/images/edits", "data": fields, "files": {"image": ("in.png", self.png, "image/png")}}
        content: Any = f"Hello #{p.index}"
        if p.kind in ("img2text", "img2img"):
            content = [{"type": "text", "text": f"What is this #{p.index}?"},
                       {"type": "image_url", "image_url": {"url": self.data_uri}}]
        body: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "stream": p.stream, **model}
        if p.kind in ("text2img", "img2img"):
            body.update(modalities=["image"], **image)
        else:
            body.update(max_tokens=tokens)
        return {"url": "/v1/chat/completions", "json": body}

    async def run_one(self, client: httpx.AsyncClient, p: Planned) -> Outcome:
        out = Outcome(p)
        t0 = time.perf_counter()
        kwargs = self.request(p)
        try:
            async with client.stream("POST", self.url + kwargs.pop("url"), headers=self.headers,
                                     timeout=self.timeout, **kwargs) as r:
                out.status = r.status_code
                if p.cancel:
                    events = 0
                    async for line in r.aiter_lines():
                        events += line.startswith("data: ")
                        if events >= 2:
                            break
                    out.ok = r.status_code == 200  # leaving the block closes the connection mid-way
                    return out
                if p.stream:
                    lines = [line async for line in r.aiter_lines()]
                    out.problem = check_stream(p, r.status_code, lines)
                else:
                    await r.aread()
                    out.problem = check_body(p, r.status_code, r.content)
        except Exception as e:
            out.problem = f"{type(e).__name__}: {e}"
            return out
        finally:
            out.latency_s = time.perf_counter() - t0
        out.ok = out.problem is None
        return out

    async def run(self, planned: list[Planned], concurrency: int, deadline: float) -> Report:
        """Every planned request, at most `concurrency` at once; past `deadline` seconds the ones still
        running are abandoned (and count as lost)."""
        sem = asyncio.Semaphore(concurrency)
        outcomes: list[Outcome] = []
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        t0 = time.perf_counter()
        async with httpx.AsyncClient(limits=limits) as client:
            async def one(p: Planned) -> None:
                async with sem:
                    outcomes.append(await self.run_one(client, p))

            tasks = [asyncio.create_task(one(p)) for p in planned]
            _, late = await asyncio.wait(tasks, timeout=deadline)
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        return Report(outcomes, time.perf_counter() - t0, len(planned))


def _image_ok(b64: str) -> str | None:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    return None if img.size == (SIZE, SIZE) else f"image of size {img.size}"


def check_body(p: Planned, status: int, raw: bytes) -> str | None:
    """None when a one-piece answer has OpenAI's shape; else what is wrong."""
    if status != 200:
        return raw.decode(errors="replace")[:300]
    body = json.loads(raw)
    if p.endpoint in ("generations", "edits"):
        data = body.get("data")
        if not isinstance(data, list) or len(data) != 1 or "b64_json" not in data[0]:
            return f"no image in {str(body)[:200]}"
        return _image_ok(data[0]["b64_json"])
    if body.get("object") != "chat.completion" or len(body.get("choices", [])) != 1:
        return f"not a chat.completion: {str(body)[:200]}"
    choice, usage = body["choices"][0], body.get("usage", {})
    if choice.get("finish_reason") not in ("stop", "length") or choice["message"].get("role") != "assistant":
        return f"bad choice {str(choice)[:200]}"
    if usage.get("total_tokens") != usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0):
        return f"bad usage {usage}"
    content = choice["message"]["content"]
    if p.kind in ("text2img", "img2img"):
        if not isinstance(content, list) or content[0].get("type") != "image_url":
            return f"no image part in {str(content)[:200]}"
        return _image_ok(content[0]["image_url"]["url"].split(",", 1)[1])
    return None if isinstance(content, str) else f"content {content!r}"


def check_stream(p: Planned, status: int, lines: list[str]) -> str | None:
    """None when a server-sent-event answer has OpenAI's shape and ends with [DONE]; else what is wrong."""
    if status != 200:
        return " ".join(lines)[:300]
    payloads = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    if not payloads or payloads[-1] != "[DONE]":
        return f"no [DONE] at the end: {payloads[-1:]}"
    events = [json.loads(x) for x in payloads[:-1]]
    errors = [e for e in events if "error" in e]
    if errors:
        return f"error event {errors[0]}"
    if p.endpoint in ("generations", "edits"):
        done = [e for e in events if e.get("type") == "image_generation.completed"]
        return _image_ok(done[0]["b64_json"]) if len(done) == 1 else f"{len(done)} completed events"
    if any(e.get("object") != "chat.completion.chunk" for e in events):
        return "a chunk that is not a chat.completion.chunk"
    if not any(c.get("finish_reason") in ("stop", "length") for e in events for c in e["choices"]):
        return "no finish_reason"
    if p.kind in ("text2img", "img2img"):
        parts = [c["delta"]["content"] for e in events for c in e["choices"]
                 if isinstance(c["delta"].get("content"), list)]
        return _image_ok(parts[0][0]["image_url"]["url"].split(",", 1)[1]) if len(parts) == 1 else "no image part"
    return None


def run_load(url: str, *, requests: int = 500, concurrency: int = 32, seed: int = 0, cancel_fraction: float = 0.1,
             max_tokens: int = 8, steps: int = 2, timeout: float = 300.0, deadline: float = 600.0,
             api_key: str | None = None, model: str | None = None) -> Report:
    """Run the load against `url` and return the report (the caller decides what fails)."""
    driver = Driver(url, api_key=api_key, model=model, max_tokens=max_tokens, steps=steps, timeout=timeout)
    return asyncio.run(driver.run(plan(requests, seed, cancel_fraction), concurrency, deadline))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="fixes the mix of requests")
    ap.add_argument("--cancel-fraction", type=float, default=0.1, help="share closed mid-way")
    ap.add_argument("--max-tokens", type=int, default=8, help="of text answers")
    ap.add_argument("--steps", type=int, default=2, help="denoising steps of images (32x32)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--deadline", type=float, default=600.0, help="seconds for the whole run")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model", default=None, help="the model field (default: none sent)")
    a = ap.parse_args(argv)
    report = run_load(a.url, requests=a.requests, concurrency=a.concurrency, seed=a.seed,
                      cancel_fraction=a.cancel_fraction, max_tokens=a.max_tokens, steps=a.steps, timeout=a.timeout,
                      deadline=a.deadline, api_key=a.api_key, model=a.model)
    print(report.summary())
    return 1 if report.failures or report.lost else 0


if __name__ == "__main__":
    sys.exit(main())
