"""The HTTP server: a real uvicorn server on localhost (the tiny checkpoint, single stage, CPU), driven with
the `openai` client and raw httpx: every endpoint, streaming, keys, limits, error shapes, the bounded queue,
cancellation freeing KV blocks, and requests of different clients sharing forwards."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import openai
import pytest
from PIL import Image

from bagel_serve import Omni
from bagel_serve.serving.run import ServerThread
from bagel_serve.serving.settings import ServerSettings

NAME = "bagel-test"
SMALL = {"size": "32x32", "num_inference_steps": 3, "seed": 1}


@pytest.fixture(scope="module")
def server(omni: Omni) -> ServerThread:
    s = ServerThread(omni, ServerSettings(port=0, served_model_name=NAME, max_queue=64)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def guarded(omni: Omni) -> ServerThread:
    """The same engine behind a key, small limits and one allowed media domain."""
    s = ServerThread(omni, ServerSettings(port=0, served_model_name=NAME, api_key="sesame", max_queue=64,
                                          max_upload_mb=0.05, max_pixels=48 * 48,
                                          allowed_media_domains=["127.0.0.1"])).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def png(w: int = 32, h: int = 32, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def sse(lines) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in err["message"]
    return err


# ------------------------------------------------------------------------------------------------ meta
def test_models_health_version(server: ServerThread, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert httpx.get(server.url + "/version").json()["version"]
    err = error_of(httpx.get(server.url + "/v1/models/other"), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert error_of(httpx.get(server.url + "/v1/nothing"), 404)["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_defaults_are_what_a_request_without_them_gets(server: ServerThread, guarded: ServerThread) -> None:
    d = httpx.get(server.url + "/v1/defaults").json()
    assert d["model"] == NAME and d["notice"] is None  # not the demo model's name
    assert d["edit"]["size"] == "auto" and d["limits"]["max_n"] == 10 and d["limits"]["max_images"] == 8
    img = d["image"]
    assert (img["num_inference_steps"], img["cfg_text_scale"], img["cfg_img_scale"], img["cfg_interval"],
            img["cfg_renorm_type"], img["timestep_shift"]) == (50, 4.0, 1.5, [0.4, 1.0], "global", 3.0)
    assert d["text"]["temperature"] == 0.0 and d["text"]["max_tokens"] == 1000  # greedy, max_think_tokens
    r = httpx.post(server.url + "/v1/images/generations", timeout=60,
                   json={"prompt": "a cat", "num_inference_steps": 2, "seed": 1})
    assert r.json()["size"] == img["size"] == f"{d['limits']['max_image_side']}x{d['limits']['max_image_side']}"
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
    decoding = {k: d["text"][k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")}
    a = httpx.post(server.url + "/v1/chat/completions", timeout=60, json=chat)
    b = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={**chat, **decoding})
    assert a.json()["choices"][0]["message"] == b.json()["choices"][0]["message"]
    assert error_of(httpx.get(guarded.url + "/v1/defaults"), 401)["code"] == "invalid_api_key"


# ------------------------------------------------------------------------------------------------ chat
def test_chat_text_and_streaming_agree(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Hello there"}]
    full = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=6)
    choice = full.choices[0]
    assert choice.finish_reason in ("length", "stop") and full.usage.completion_tokens <= 6
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens and not chunks[-1].choices
    two = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=3, n=2, temperature=0.8, top_p=0.9,
                                         seed=5)
    assert [c.index for c in two.choices] == [0, 1]


def test_chat_think_reasoning_content(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Why?"}]
    full = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, extra_body={"think": True})
    raw = full.choices[0].message.model_dump()
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, stream=True,
                                                 extra_body={"think": True}))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == (raw.get("reasoning_content") or "") and content == raw["content"]
    assert reasoning or content  # a think run produced text, routed to one of the two


def test_chat_image_input_and_image_output(server: ServerThread, client: openai.OpenAI) -> None:
    parts = [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": data_uri(png())}}]
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": parts}], max_tokens=4)
    assert out.usage.completion_tokens >= 1
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "a cat"}], "modalities": ["image"], **SMALL})
    part = r.json()["choices"][0]["message"]["content"][0]
    assert r.status_code == 200 and part["type"] == "image_url"
    img = Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1])))
    assert img.size == (32, 32)


def test_chat_messages_are_the_ordered_inputs(client: openai.OpenAI, omni: Omni) -> None:
    """Every text part and image of every message, in order, is one segment of the context: the answer is
    `Omni.generate`'s for that `inputs` list, and not the one of the same parts in another order."""
    red, blue = png(32, 32, (200, 30, 30)), png(40, 24, (20, 40, 220))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(red)}},
                                             {"type": "text", "text": "and this one"},
                                             {"type": "image_url", "image_url": {"url": data_uri(blue)}}]},
                {"role": "user", "content": "What differs between them?"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in (red, blue)]
    want = omni.generate([{"modality": "img2text", "max_tokens": 8,
                           "inputs": [images[0], "and this one", images[1], "What differs between them?"]}])[0]
    assert r.choices[0].message.content == want.text
    other = omni.generate([{"modality": "img2text", "max_tokens": 8,
                            "inputs": [images[1], "and this one", images[0], "What differs between them?"]}])[0]
    assert other.token_ids != want.token_ids


def test_chat_stop_string(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Hello there"}]
    full = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8).choices[0].message.content
    if len(full) < 3:
        pytest.skip("the random model's answer is too short to cut")
    stop = full[2:4]
    cut = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.find(stop)] and cut.finish_reason == "stop"


# ------------------------------------------------------------------------------------------------ images
def test_image_generations(server: ServerThread, client: openai.OpenAI) -> None:
    res = client.images.generate(model=NAME, prompt="a cat", n=2, size="32x32",
                                 extra_body={"num_inference_steps": 3, "seed": 1, "cfg_text_scale": 3.0})
    imgs = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in res.data]
    assert [i.size for i in imgs] == [(32, 32)] * 2 and imgs[0].tobytes() != imgs[1].tobytes()  # seeds 1 and 2
    again = client.images.generate(model=NAME, prompt="a cat", size="32x32", response_format="url",
                                   extra_body={"num_inference_steps": 3, "seed": 1, "cfg_text_scale": 3.0,
                                               "output_format": "webp"})
    got = httpx.get(again.data[0].url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(got.content)).size == (32, 32)
    assert error_of(httpx.get(server.url + "/v1/images/deadbeef"), 404)["code"] == "image_not_found"
    think = client.images.generate(model=NAME, prompt="a cat", size="32x32",
                                   extra_body={**SMALL, "think": True, "max_think_tokens": 4})
    assert think.data[0].revised_prompt is not None


def test_image_edits(client: openai.OpenAI) -> None:
    res = client.images.edit(model=NAME, image=("in.png", png(40, 40), "image/png"), prompt="blue", size="32x32",
                             extra_body={"num_inference_steps": 3, "seed": 3, "output_format": "jpeg"})
    assert Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))).format == "JPEG"


def test_image_streaming_progress(server: ServerThread) -> None:
    with httpx.stream("POST", server.url + "/v1/images/generations", timeout=60,
                      json={"prompt": "a cat", "stream": True, **SMALL}) as r:
        events = sse(r.iter_lines())
    progress = [e for e in events[:-1] if e["type"] == "image_generation.progress"]
    assert [p["step"] for p in progress] == [1, 2] and progress[0]["total_steps"] == 2
    done = events[-2]
    assert done["type"] == "image_generation.completed" and done["b64_json"] and events[-1] == "[DONE]"


# ------------------------------------------------------------------------------------------------ errors
def test_bad_fields_are_400_with_param(server: ServerThread) -> None:
    url = server.url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    assert error_of(httpx.post(url, json={"messages": msgs, "temperature": -1}), 400)["param"] == "temperature"
    assert error_of(httpx.post(url, json={"messages": msgs, "n": 11}), 400)["param"] == "n"
    assert error_of(httpx.post(url, json={"messages": msgs, "bogus": 1}), 400)["param"] == "bogus"
    assert error_of(httpx.post(url, json={"messages": []}), 400)["param"] == "messages"
    gen = server.url + "/v1/images/generations"
    assert error_of(httpx.post(gen, json={"prompt": "x", "size": "33x32"}), 400)["param"] == "size"
    assert error_of(httpx.post(gen, json={"prompt": "x", "num_inference_steps": 1}), 400)["param"] == "num_inference_steps"
    assert error_of(httpx.post(gen, json={"prompt": "x", "size": "4096x4096"}), 400)["param"] == "size"
    assert error_of(httpx.post(gen, content=b"{nope", headers={"content-type": "application/json"}), 422)
    remote = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}
    assert error_of(httpx.post(url, json=remote), 400)["code"] == "domain_not_allowed"


def test_key_and_limits(guarded: ServerThread) -> None:
    url = guarded.url + "/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert error_of(httpx.post(url, json=body), 401)["type"] == "authentication_error"
    assert error_of(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert error_of(httpx.get(guarded.url + "/v1/models"), 401)
    assert httpx.get(guarded.url + "/health").status_code == 200  # outside /v1
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key="sesame", max_retries=0)
    assert client.chat.completions.create(model=NAME, **body).choices
    auth = {"Authorization": "Bearer sesame"}
    big = {"messages": [{"role": "user", "content": "x" * 60_000}]}
    assert error_of(httpx.post(url, json=big, headers=auth), 413)["code"] == "too_large"
    parts = [{"type": "image_url", "image_url": {"url": data_uri(png(64, 64))}}]  # over --max-pixels 48*48
    err = error_of(httpx.post(url, json={"messages": [{"role": "user", "content": parts}]}, headers=auth), 413)
    assert "pixels" in err["message"]


def test_remote_image_from_an_allowed_domain(guarded: ServerThread) -> None:
    import http.server

    image = png(32, 32)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://example.com/a.png")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_port}"
        auth = {"Authorization": "Bearer sesame"}

        def ask(path: str) -> httpx.Response:
            parts = [{"type": "text", "text": "what"}, {"type": "image_url", "image_url": {"url": base + path}}]
            return httpx.post(guarded.url + "/v1/chat/completions", headers=auth, timeout=60,
                              json={"messages": [{"role": "user", "content": parts}], "max_tokens": 2})

        assert ask("/a.png").status_code == 200
        err = error_of(ask("/redirect"), 400)
        assert err["code"] == "domain_not_allowed" and err["param"] == "messages[0].content[1].image_url.url"
    finally:
        httpd.shutdown()


# ------------------------------------------------------------------------------------------------ engine
def test_full_queue_is_429_at_once(server: ServerThread, omni: Omni, engine_idle) -> None:
    orch = omni.orchestrator
    orch.max_queue = 1
    long = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 3000, "stream": True}
    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=long, timeout=60) as r:
            lines = r.iter_lines()  # kept: dropping the iterator closes the connection (a disconnect)
            next(lines)
            assert orch.in_flight == 1, orch.in_flight
            t0 = time.monotonic()
            second = httpx.post(server.url + "/v1/chat/completions",
                                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert time.monotonic() - t0 < 2
            assert error_of(second, 429)["code"] == "queue_full"
    finally:
        orch.max_queue = 64
    engine_idle.wait()


def test_disconnect_cancels_and_frees_kv_blocks(server: ServerThread, omni: Omni, engine_idle) -> None:
    orch = omni.orchestrator
    long = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=long, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        assert orch.in_flight == 1 and engine_idle.used_blocks() > engine_idle.blocks
    engine_idle.wait()  # the request was cancelled and gave its blocks back


def test_concurrent_clients_share_forwards(server: ServerThread, omni: Omni) -> None:
    omni.orchestrator.collect_stats()  # count from here
    results: list[int] = []

    def one(i: int) -> None:
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": f"hello #{i}"}], "max_tokens": 24})
        results.append(r.status_code)

    img = threading.Thread(target=lambda: results.append(httpx.post(
        server.url + "/v1/images/generations", timeout=60, json={"prompt": "a cat", **SMALL}).status_code))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)] + [img]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 5
    stats = omni.orchestrator.collect_stats()[0]
    assert stats.shared_forwards > 0 and stats.max_batch_requests >= 2


def test_metrics(server: ServerThread) -> None:
    text = httpx.get(server.url + "/metrics").text
    for name in ("bagel_serve_requests_total", "bagel_serve_request_latency_seconds_bucket",
                 "bagel_serve_time_to_first_token_seconds_bucket", "bagel_serve_queue_length",
                 "bagel_serve_running_requests", "bagel_serve_kv_blocks_used", "bagel_serve_kv_blocks_total",
                 "bagel_serve_generation_tokens_per_second", "bagel_serve_images_total",
                 "bagel_serve_denoising_steps_total", "bagel_serve_worker_up"):
        assert name in text, name
    assert 'bagel_serve_requests_total{endpoint="chat",modality="text2text",status="200"}' in text
