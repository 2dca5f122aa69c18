r"""HTTP serving against the engine itself on one GPU (issue 11): the same load through `Omni.generate` and
through the OpenAI-compatible server, on one `Omni` (so the engine, its limits and its weights are identical);
the server must reach >= 90 % of the engine's throughput.

Loads (the full-size random checkpoint, bundled `bagel_single_stage.yaml`, decode graphs on):

1. chat: 64 concurrent text2text requests, 512-token prompts (`<|im_start|> text <|im_end|>`, built as
   bench_serving's `prompt_of`), `max_tokens` 256, greedy (the deploy default; no seed). The engine has no
   ignore-EOS switch, so a request may stop early at `<|im_end|>`: tok/s counts the tokens each path really
   generated (`*_tokens`), and `chat_omni_all_full_length` says whether every request ran to 256.
2. images: 8 concurrent text2img 1024², 50 steps, default CFG (cfg_text 4, cfg_img 1.5, interval (0.4, 1]),
   PNG answers (`b64_json`) -> images/s.

Each load runs through `Omni.generate` (one call holding every request: the engine batches them in one
submission) and through HTTP: `serving.run.ServerThread`, i.e. `serving.app.build_app(omni, settings)` under
uvicorn with `bagel-serve serve`'s uvicorn config and its default `ServerSettings` (max_queue 256, max_pixels
1024², request timeout 600 s), on 127.0.0.1 in a thread of this process, driven by one `httpx.AsyncClient` in a
process of its own (as real clients are: a client in the server's process would take the interpreter lock
from the engine's thread while it reads 64 answers) with every request in flight at once, non-streaming (POST /v1/chat/completions, POST /v1/images/generations).
The server runs, idle, during the engine's runs too. Every HTTP answer is checked (status 200, one choice or
image, the assistant message, `usage`, a token count within `max_tokens`, a decodable PNG of the asked size);
`*_problems` lists what was wrong (empty: all well formed) and `chat_http_tokens_equal_omni` counts the
requests whose HTTP token count equals the engine's. The chat load is also run streamed (server-sent events,
`stream_options.include_usage`): time to the first content delta of each request, p50 and max.

Warm-ups, untimed: the chat load once per path; the image load's shapes through the engine (8 x 1024² at 8
steps, the fewest with both guided and unguided steps), then through HTTP at 2 steps (the routes, the PNG
encoder at 1024²). Then one measured run per path. Ratios: `*_ratio` = HTTP / engine throughput;
`*_ge_90pct` the issue's check. The JSON (`--out`) is rewritten after every section; a failing section is
recorded as "failed: <error>" and the run goes on.

Device set-up (once per fresh machine; the run tool carries the wheels in `.whl`), then the run:

    pip install --no-index --find-links .whl/serve --target /tmp/site fastapi uvicorn python-multipart \
        prometheus-client httpx
    PYTHONPATH=$PWD:/tmp/site python benchmarks/bench_http.py --ckpt /tmp/bagel-full --out $OUT/http.json
    PYTHONPATH=$PWD python benchmarks/bench_http.py --smoke --out /tmp/http-smoke.json   # CPU dry run, ~15 s

(`--write --tokenizer-dir .bench/tok` writes the full-size checkpoint to `--ckpt` first, ~40 s more.)

Estimated H200 time (seconds): load with graph capture 25, server start 1; chat: 2 x 2.4 engine + 2 x 2.6
HTTP + 2.6 streamed = 13; images: engine warm-up 13 + 76 measured (8 x 1024² x 50 steps ran 75.9 s in
docs/PERFORMANCE.md), HTTP warm-up 3 + about 78 measured = 170: about 210 s in all. The image load dominates;
`--image-steps 20` brings it to about 120 s (the HTTP overhead per image is fixed, so fewer steps make the
ratio check stricter, not looser).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import multiprocessing
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from bench_serving import prompt_of
from common import bench_checkpoint, free_device, header, parser, report
from PIL import Image

from bagel_serve import Omni
from bagel_serve.serving import require_server_dependencies

SINGLE = "bagel_single_stage.yaml"
STAGE0 = {"max_num_seqs": 256, "enforce_eager": False, "kv_cache_blocks": 4096}
"""bench_image's engine: 4096 blocks (64k tokens) hold the 64 x 768-token contexts and the 8 images' CFG
contexts."""
SECTIONS = ("chat_omni", "chat_http", "chat_stream", "images_omni", "images_http")
TARGET = 0.9
IMAGE_PROMPTS = ["A photo of a dog running on the beach.", "A lighthouse on a cliff at dawn.",
                 "A bowl of ramen on a wooden table.", "A red vintage car in the rain at night.",
                 "A snowy mountain village under the northern lights.", "A close-up of a hummingbird at a flower.",
                 "An astronaut reading a book on the moon.", "A field of sunflowers under a stormy sky."]


@dataclass(frozen=True)
class Sizes:
    """One run's loads: the issue's on a GPU, tiny ones for the CPU smoke run."""

    chats: int
    prompt_tokens: int
    max_tokens: int
    images: int
    side: int
    steps: int
    warm_steps: int
    """The engine's image warm-up: 8 steps is the fewest whose last evaluated t (shift 3) is unguided."""


FULL = Sizes(chats=64, prompt_tokens=512, max_tokens=256, images=8, side=1024, steps=50, warm_steps=8)
SMOKE = Sizes(chats=8, prompt_tokens=32, max_tokens=8, images=2, side=64, steps=3, warm_steps=3)


class Bench:
    """The run's results and the sections' shared state: the engine, the server, the loads."""

    def __init__(self, args: Any, device: str, sz: Sizes) -> None:
        self.a, self.device, self.sz = args, device, sz
        self.res: dict[str, Any] = {}
        self.t0 = time.perf_counter()
        self.omni: Omni | None = None
        self.server: Any = None
        self.prompts: list[str] = []
        self.omni_tokens: list[int] = []  # per chat request, from the engine's measured run
        self.omni_texts: list[str] = []

    def save(self) -> None:
        Path(self.a.out).write_text(json.dumps(self.res, indent=2))

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}", flush=True)

    def section(self, name: str, fn: Callable[[], None]) -> None:
        """Run one section unless skipped; a failure is recorded under its name and the run goes on."""
        if name in self.a.skip:
            self.res[name] = "skipped (--skip)"
        else:
            before = set(self.res)
            try:
                fn()
                self.res[name] = "ok"
            except Exception as e:  # a failed section must not take the sections after it down
                self.res[name] = f"failed: {type(e).__name__}: {str(e)[:400]}"
            free_device()
            new = {k: v for k, v in self.res.items() if k not in before and k != name and not isinstance(v, list)}
            self.log(f"{name}: {self.res[name]} " + ", ".join(f"{k} {_short(v)}" for k, v in new.items()))
        self.save()

    def wall(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """(fn(), wall seconds), the device idle at both ends."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    # ------------------------------------------------------------------ the loads
    def chat_engine(self, i: int) -> dict[str, Any]:
        return {"modality": "text2text", "prompt": self.prompts[i], "max_tokens": self.sz.max_tokens}

    def chat_body(self, i: int, stream: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": [{"role": "user", "content": self.prompts[i]}],
                                "max_tokens": self.sz.max_tokens}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return body

    def image_engine(self, i: int, steps: int) -> dict[str, Any]:
        s = self.sz.side
        return {"modality": "text2img", "prompt": IMAGE_PROMPTS[i % len(IMAGE_PROMPTS)], "height": s, "width": s,
                "steps": steps, "seed": 100 + i}

    def image_body(self, i: int, steps: int) -> dict[str, Any]:
        s = self.sz.side
        return {"prompt": IMAGE_PROMPTS[i % len(IMAGE_PROMPTS)], "size": f"{s}x{s}", "num_inference_steps": steps,
                "seed": 100 + i, "n": 1, "response_format": "b64_json", "output_format": "png"}

    def generate(self, reqs: list[dict[str, Any]]) -> list:
        """omni.generate, raising the first failed request's error (generate keeps going past failures)."""
        outs = self.omni.generate(reqs)
        for o in outs:
            if not o.ok:
                raise o.error
        return outs


# ---------------------------------------------------------------------- HTTP client
def _client(n: int) -> Any:
    import httpx

    return httpx.AsyncClient(timeout=httpx.Timeout(900.0),
                             limits=httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8))


async def _post_all(client: Any, url: str, bodies: list[dict[str, Any]]) -> tuple[list[tuple[int, Any]], float]:
    """POST every body at once; ((status, parsed JSON body or its text) per body, wall seconds until the last
    answer was read). Parsing is left out of the time."""
    t0 = time.perf_counter()
    answers = await asyncio.gather(*(client.post(url, json=b) for b in bodies))
    wall = time.perf_counter() - t0
    out = []
    for r in answers:
        try:
            out.append((r.status_code, r.json()))
        except ValueError:
            out.append((r.status_code, r.text[:300]))
    return out, wall


def in_client_process(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a fresh process: the HTTP client apart from the server and the engine."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(fn, *args).result()


def http_runs(url: str, warm: list[dict[str, Any]], measured: list[dict[str, Any]]) -> tuple[list, float]:
    """One warm-up load (answers checked for status only), then the measured one, on one client."""
    async def main() -> tuple[list, float]:
        async with _client(max(len(warm), len(measured))) as client:
            got, _ = await _post_all(client, url, warm)
            bad = [(s, b) for s, b in got if s != 200]
            if bad:
                raise RuntimeError(f"warm-up: {len(bad)} of {len(got)} answers failed, first: {bad[0][0]} {bad[0][1]}")
            return await _post_all(client, url, measured)

    return asyncio.run(main())


async def _stream_one(client: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed chat request: seconds to its first content delta, its token count (usage), problems."""
    t0 = time.perf_counter()
    first: float | None = None
    tokens: int | None = None
    problems: list[str] = []
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            return {"ttft": None, "tokens": 0, "problems": [f"status {r.status_code}: {(await r.aread())[:200]!r}"]}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if "error" in ev:
                problems.append(f"error event: {str(ev['error'])[:200]}")
            if ev.get("usage"):
                tokens = ev["usage"].get("completion_tokens")
            if first is None and any(c.get("delta", {}).get("content") for c in ev.get("choices", [])):
                first = time.perf_counter() - t0
    if tokens is None:
        problems.append("no usage chunk")
    return {"ttft": first, "tokens": tokens or 0, "problems": problems}


def stream_run(url: str, bodies: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], float]:
    async def main() -> tuple[list[dict[str, Any]], float]:
        async with _client(len(bodies)) as client:
            t0 = time.perf_counter()
            got = await asyncio.gather(*(_stream_one(client, url, b) for b in bodies))
            return got, time.perf_counter() - t0

    return asyncio.run(main())


# ---------------------------------------------------------------------- answer checks
def chat_problems(answers: list[tuple[int, Any]], max_tokens: int) -> tuple[list[str], list[int], list[str]]:
    """(problems, completion tokens per answer, answer texts) of non-streamed chat answers."""
    problems, tokens, texts = [], [], []
    for i, (status, body) in enumerate(answers):
        where = f"chat {i}"
        if status != 200 or not isinstance(body, dict):
            problems.append(f"{where}: status {status}: {str(body)[:200]}")
            tokens.append(0)
            texts.append("")
            continue
        choices = body.get("choices") or []
        usage = body.get("usage") or {}
        n = usage.get("completion_tokens")
        msg = choices[0].get("message", {}) if len(choices) == 1 else {}
        if body.get("object") != "chat.completion" or len(choices) != 1:
            problems.append(f"{where}: object {body.get('object')!r}, {len(choices)} choices")
        if msg.get("role") != "assistant" or not isinstance(msg.get("content"), str):
            problems.append(f"{where}: message {str(msg)[:120]}")
        if not isinstance(n, int) or not 1 <= n <= max_tokens:
            problems.append(f"{where}: completion_tokens {n!r}, asked for at most {max_tokens}")
        elif (choices[0].get("finish_reason") == "length") != (n == max_tokens):
            problems.append(f"{where}: finish_reason {choices[0].get('finish_reason')!r} with {n} tokens")
        tokens.append(n if isinstance(n, int) else 0)
        texts.append(msg.get("content") if isinstance(msg.get("content"), str) else "")
    return problems, tokens, texts


def image_problems(answers: list[tuple[int, Any]], side: int) -> list[str]:
    """What is wrong with each images answer: status, one datum, a PNG of side x side in b64_json."""
    problems = []
    for i, (status, body) in enumerate(answers):
        where = f"image {i}"
        if status != 200 or not isinstance(body, dict):
            problems.append(f"{where}: status {status}: {str(body)[:200]}")
            continue
        data = body.get("data") or []
        if len(data) != 1 or "b64_json" not in data[0] or body.get("size") != f"{side}x{side}":
            problems.append(f"{where}: {len(data)} data, size {body.get('size')!r}")
            continue
        try:
            img = Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"], validate=True)))
            img.load()
        except Exception as e:
            problems.append(f"{where}: the image does not decode: {type(e).__name__}: {e}")
            continue
        if img.format != "PNG" or img.size != (side, side):
            problems.append(f"{where}: {img.format} {img.size}, asked for PNG {side}x{side}")
    return problems


# ---------------------------------------------------------------------- sections
def engine_stats(stats: list, prefix: str) -> dict[str, Any]:
    """What the engine did for a load: packed forwards, the most requests in one, seconds per phase (the
    same load should give the same numbers through either path)."""
    st = stats[0]
    return {f"{prefix}_forwards": st.forwards, f"{prefix}_max_batch_requests": st.max_batch_requests,
            **{f"{prefix}_{phase}_s": round(sec, 3) for phase, sec in st.phase_s.items()}}


def chat_omni(b: Bench) -> None:
    sz, res = b.sz, b.res
    reqs = [b.chat_engine(i) for i in range(sz.chats)]
    b.generate(reqs)
    outs, t = b.wall(lambda: b.generate(reqs))
    res.update(engine_stats(b.omni.stage_stats, "chat_omni"))  # this generate call's
    b.omni_tokens = [len(o.token_ids) for o in outs]
    b.omni_texts = [o.text for o in outs]
    toks = sum(b.omni_tokens)
    res.update(chat_omni_s=t, chat_omni_tokens=toks, chat_omni_tok_s=toks / t,
               chat_omni_all_full_length=all(n == sz.max_tokens for n in b.omni_tokens),
               chat_omni_shortest=min(b.omni_tokens))


def chat_http(b: Bench) -> None:
    sz, res = b.sz, b.res
    url = b.server.url + "/v1/chat/completions"
    bodies = [b.chat_body(i) for i in range(sz.chats)]
    in_client_process(http_runs, url, bodies, [])
    b.omni.orchestrator.collect_stats()  # counting starts again
    orch = b.omni.orchestrator
    submits: list[float] = []
    submit = orch.submit

    def timed_submit(*a: Any, **k: Any) -> Any:
        submits.append(time.perf_counter())
        return submit(*a, **k)

    orch.submit = timed_submit
    try:
        answers, t = in_client_process(http_runs, url, [], bodies)
    finally:
        del orch.submit
    res.update(engine_stats(orch.collect_stats(), "chat_http"))
    if submits:  # when the requests reached the engine (the client's process starts first: ~1-2 s)
        res.update(chat_http_submit_spread_s=submits[-1] - submits[0])
    problems, tokens, texts = chat_problems(answers, sz.max_tokens)
    toks = sum(tokens)
    res.update(chat_http_s=t, chat_http_tokens=toks, chat_http_tok_s=toks / t,
               chat_http_prompt_tokens=sum(a[1].get("usage", {}).get("prompt_tokens", 0) for a in answers
                                           if isinstance(a[1], dict)),
               chat_http_well_formed=not problems, chat_http_problems=problems[:8])
    if b.omni_tokens:
        res["chat_http_tokens_equal_omni"] = sum(x == y for x, y in zip(tokens, b.omni_tokens))
        res["chat_http_text_equal_omni"] = sum(x == y for x, y in zip(texts, b.omni_texts))
    if "chat_omni_tok_s" in res:
        res["chat_http_ratio"] = res["chat_http_tok_s"] / res["chat_omni_tok_s"]
        res["chat_http_ge_90pct"] = res["chat_http_ratio"] >= TARGET
    if problems:
        raise RuntimeError(f"{len(problems)} malformed answer(s), first: {problems[0]}")


def chat_stream(b: Bench) -> None:
    sz, res = b.sz, b.res
    got, t = in_client_process(stream_run, b.server.url + "/v1/chat/completions",
                               [b.chat_body(i, stream=True) for i in range(sz.chats)])
    ttfts = [g["ttft"] for g in got if g["ttft"] is not None]
    problems = [p for g in got for p in g["problems"]]
    toks = sum(g["tokens"] for g in got)
    res.update(chat_stream_s=t, chat_stream_tokens=toks, chat_stream_tok_s=toks / t,
               chat_stream_ttft_p50_s=statistics.median(ttfts) if ttfts else None,
               chat_stream_ttft_max_s=max(ttfts) if ttfts else None,
               chat_stream_no_content=len(got) - len(ttfts), chat_stream_problems=problems[:8])
    if "chat_omni_tok_s" in res:
        res["chat_stream_ratio"] = res["chat_stream_tok_s"] / res["chat_omni_tok_s"]
    if problems:
        raise RuntimeError(f"{len(problems)} problem(s), first: {problems[0]}")


def images_omni(b: Bench) -> None:
    sz, res = b.sz, b.res
    b.generate([b.image_engine(i, sz.warm_steps) for i in range(sz.images)])
    reqs = [b.image_engine(i, b.a.image_steps) for i in range(sz.images)]
    outs, t = b.wall(lambda: b.generate(reqs))
    sizes = [o.images[0].size for o in outs]
    if sizes != [(sz.side, sz.side)] * sz.images:
        raise RuntimeError(f"image sizes {sizes}, asked for {sz.side}²")
    res.update(images_omni_s=t, images_omni_images_s=sz.images / t)


def images_http(b: Bench) -> None:
    sz, res = b.sz, b.res
    url = b.server.url + "/v1/images/generations"
    warm = [b.image_body(i, 2) for i in range(sz.images)]
    answers, t = in_client_process(http_runs, url, warm, [b.image_body(i, b.a.image_steps) for i in range(sz.images)])
    problems = image_problems(answers, sz.side)
    res.update(images_http_s=t, images_http_images_s=sz.images / t, images_http_well_formed=not problems,
               images_http_problems=problems[:8])
    if "images_omni_images_s" in res:
        res["images_http_ratio"] = res["images_http_images_s"] / res["images_omni_images_s"]
        res["images_http_ge_90pct"] = res["images_http_ratio"] >= TARGET
    if problems:
        raise RuntimeError(f"{len(problems)} malformed answer(s), first: {problems[0]}")


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def start(b: Bench) -> None:
    """Load the engine, build the prompts, start the server on it (a free port on 127.0.0.1)."""
    from bagel_serve.serving.run import ServerThread
    from bagel_serve.serving.settings import ServerSettings

    b.omni, t = b.wall(lambda: Omni(b.a.ckpt, device=b.device, deploy_config=SINGLE, stage_overrides={"0": STAGE0}))
    b.res["load_s"] = t
    b.generate([{"modality": "text2text", "prompt": "warm up", "max_tokens": 4}])
    b.prompts = [prompt_of(b.omni, b.sz.prompt_tokens, i) for i in range(b.sz.chats)]
    lengths = [len(b.omni.tokenizer.segment(p)) for p in b.prompts]
    settings = ServerSettings(host="127.0.0.1", port=0)
    b.server = ServerThread(b.omni, settings, str(b.a.ckpt)).start()
    b.res.update(chat_prompt_tokens_min=min(lengths), chat_prompt_tokens_max=max(lengths),
                 server_max_queue=settings.max_queue, server_max_pixels=settings.max_pixels,
                 server_request_timeout_s=settings.request_timeout)
    b.log(f"loaded in {t:.1f} s; serving on {b.server.url}")


def main() -> None:
    ap = parser("bench_http.json")
    ap.add_argument("--write", action="store_true", help="write the full-size random checkpoint to --ckpt first")
    ap.add_argument("--tokenizer-dir", default=None, help="Qwen tokenizer files for the written checkpoint")
    ap.add_argument("--image-steps", type=int, default=None,
                    help="denoising steps of the measured image runs (default 50; --smoke 3)")
    ap.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, metavar="SECTION",
                    help=f"sections to skip: {' '.join(SECTIONS)}")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU dry run: a tiny random checkpoint in a temporary directory (--ckpt and --write are "
                         "ignored), tiny loads")
    a = ap.parse_args()
    require_server_dependencies()
    device = "cpu" if a.smoke else "cuda"
    sz = SMOKE if a.smoke else FULL
    if a.image_steps is None:
        a.image_steps = sz.steps
    if a.image_steps < 2:
        ap.error(f"--image-steps must be >= 2, got {a.image_steps}")
    b = Bench(a, device, sz)
    b.res.update(header() if device == "cuda" else {"device": "cpu (smoke)", "torch": torch.__version__,
                                                     "date": time.strftime("%Y-%m-%d")})
    b.res.update(smoke=a.smoke, chat_requests=sz.chats, chat_prompt_tokens=sz.prompt_tokens,
                 chat_max_tokens=sz.max_tokens, image_requests=sz.images, image_side=sz.side,
                 image_steps=a.image_steps)
    scratch = tempfile.TemporaryDirectory(prefix="bench-http-")  # removed when the run ends
    write_s = bench_checkpoint(a, Path(scratch.name))
    if write_s is not None:
        b.res["write_s"] = write_s
    start(b)
    b.save()
    try:
        for name, fn in (("chat_omni", chat_omni), ("chat_http", chat_http), ("chat_stream", chat_stream),
                         ("images_omni", images_omni), ("images_http", images_http)):
            b.section(name, lambda: fn(b))
    finally:
        b.server.stop()
        b.omni.shutdown()
    b.res["total_s"] = time.perf_counter() - b.t0
    report({k: v for k, v in b.res.items() if not isinstance(v, list)}, a.out)  # the table without the lists
    b.save()


if __name__ == "__main__":
    main()
