"""The playground at `/`, in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) against a real uvicorn server on the tiny checkpoint: the page loads with this server's defaults
in its controls; text→image and an edit (a PNG uploaded through the file input) show their images with live
step progress, their parameters and a download link; image→text and chat answers stream in, think text apart,
and are the answers the API gives for the same fields; with an API key the page says so on 401 and works once
the key is entered. Chromium missing is a failure naming the install command, never a skip."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
from PIL import Image

from bagel_serve.serving.run import ServerThread
from bagel_serve.serving.settings import ServerSettings
from bagel_serve.testing.browser import BrowserUnavailable, headless_chromium

NAME = "bagel-playground"
KEY = "open-sesame"
WAIT_S = 60.0

# Records, on every DOM change under `root`, the text length of the last element matching `sel` and every
# `.step` caption: so the test sees what the page showed while a stream ran, not only its end.
OBSERVE = """
const [root, sel] = arguments;
window.__seen = {lengths: [], steps: []};
new MutationObserver(() => {
  const all = root.querySelectorAll(sel);
  if (all.length) window.__seen.lengths.push(all[all.length - 1].textContent.length);
  for (const s of root.querySelectorAll('.step')) window.__seen.steps.push(s.textContent);
}).observe(root, {subtree: true, childList: true, characterData: true, attributes: true});
"""


@pytest.fixture(scope="module")
def server(omni: Any) -> ServerThread:
    s = ServerThread(omni, ServerSettings(port=0, served_model_name=NAME)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed(omni: Any) -> ServerThread:
    s = ServerThread(omni, ServerSettings(port=0, served_model_name=NAME, api_key=KEY)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser() -> Any:
    try:
        driver = headless_chromium(1280, 1000)
    except BrowserUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser: Any, server: ServerThread) -> Any:
    """The page freshly loaded from `server`, its defaults read."""
    return open_page(browser, server.url)


def open_page(browser: Any, url: str, ready: bool = True) -> Any:
    browser.get(url + "/")
    if ready:
        until(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "true")
    return browser


def until(browser: Any, cond: Callable[[Any], Any], timeout: float = WAIT_S) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.05).until(cond)
    except Exception:
        logs = [e["message"] for e in browser.get_log("browser")]
        status = [s.text for s in browser.find_elements("css selector", ".status, #banner")]
        raise AssertionError(f"the page did not get there; status {status}; console {logs}") from None


def css(browser: Any, selector: str) -> Any:
    return browser.find_element("css selector", selector)


def fill(form: Any, **values: Any) -> None:
    for name, value in values.items():
        el = form.find_element("name", name)
        if el.get_attribute("type") == "checkbox":
            if el.is_selected() != bool(value):
                el.click()
            continue
        el.clear()
        el.send_keys(str(value))


def tab(browser: Any, name: str) -> Any:
    css(browser, f'[data-tab="{name}"]').click()
    return css(browser, f"#form-{name}")


def png_file(tmp_path: Path, w: int = 40, h: int = 40) -> Path:
    path = tmp_path / "input.png"
    Image.new("RGB", (w, h), (200, 30, 30)).save(path)
    return path


def shown_image(browser: Any, panel: str) -> Image.Image:
    img = until(browser, lambda d: d.find_elements("css selector", f"#tab-{panel} img.result-image"))[0]
    until(browser, lambda d: img.get_attribute("complete") == "true" and int(img.get_attribute("naturalWidth")) > 0)
    src = img.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def params(browser: Any, panel: str) -> dict[str, str]:
    dl = css(browser, f"#tab-{panel} .card .params")
    keys = [e.text for e in dl.find_elements("tag name", "dt")]
    return dict(zip(keys, [e.text for e in dl.find_elements("tag name", "dd")]))


def severe_console_errors(browser: Any) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


# ------------------------------------------------------------------------------------------------ tests
def test_page_loads_with_the_servers_defaults(page: Any, server: ServerThread) -> None:
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and "default-src 'self'" in r.headers["content-security-policy"]
    for path in ("/", "/static/app.js", "/static/style.css"):
        text = httpx.get(server.url + path).text
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), f"{path} refers to another host"
    assert css(page, "#model").text == NAME and css(page, "#notice").get_attribute("hidden") is not None
    defaults = httpx.get(server.url + "/v1/defaults").json()
    form = css(page, "#form-text2img")
    for name in ("num_inference_steps", "cfg_text_scale", "cfg_img_scale", "cfg_renorm_min", "timestep_shift",
                 "max_think_tokens"):
        assert float(form.find_element("name", name).get_attribute("value")) == defaults["image"][name], name
    assert form.find_element("name", "size").get_attribute("value") == defaults["image"]["size"]
    low, high = (form.find_element("name", f"cfg_interval.{i}").get_attribute("value") for i in (0, 1))
    assert [float(low), float(high)] == defaults["image"]["cfg_interval"]
    assert form.find_element("name", "cfg_renorm_type").get_attribute("value") == defaults["image"]["cfg_renorm_type"]
    assert not form.find_element("name", "max_think_tokens").is_enabled()  # only with think
    fill(form, think=True)
    assert form.find_element("name", "max_think_tokens").is_enabled()
    assert css(page, "#form-img2img").find_element("name", "size").get_attribute("value") == "auto"
    chat = css(page, "#form-chat")
    assert chat.find_element("name", "max_tokens").get_attribute("value") == str(defaults["text"]["max_tokens"])
    assert not chat.find_element("name", "top_p").is_enabled()  # greedy by default: top_p does nothing
    assert severe_console_errors(page) == []


def test_text_to_image_shows_the_image_with_progress_and_parameters(page: Any) -> None:
    form = css(page, "#form-text2img")
    fill(form, size="32x32", num_inference_steps=3, seed=7)
    page.execute_script(OBSERVE, css(page, "#tab-text2img .results"), ".step")
    form.find_element("css selector", "button.run").click()
    image = shown_image(page, "text2img")
    assert image.size == (32, 32)
    assert {"step 1 / 2", "step 2 / 2"} <= set(page.execute_script("return window.__seen.steps"))
    shown = params(page, "text2img")
    assert shown["num_inference_steps"] == "3" and shown["seed"] == "7" and shown["size"] == "32x32"
    link = css(page, "#tab-text2img a.download")
    assert link.get_attribute("download") == "bagel-7.png" and link.get_attribute("href").startswith("data:image/png")
    until(page, lambda d: "1 image in" in css(d, "#tab-text2img .status").text)


def test_edit_uploads_a_png_and_shows_the_image(page: Any, tmp_path: Path) -> None:
    form = tab(page, "img2img")
    form.find_element("css selector", "input[type=file]").send_keys(str(png_file(tmp_path)))
    fill(form, size="32x32", num_inference_steps=3, seed=3, cfg_img_scale=2.0)
    form.find_element("css selector", "button.run").click()
    assert shown_image(page, "img2img").size == (32, 32)
    shown = params(page, "img2img")
    assert shown["image"] == "input.png" and shown["cfg_img_scale"] == "2" and shown["seed"] == "3"


def streamed_answer(page: Any, panel: str, start: Callable[[], None]) -> tuple[str, str, list[int]]:
    """(think text, answer, the answer's lengths as the page showed them) of the request `start` sends."""
    page.execute_script(OBSERVE, css(page, f"#tab-{panel} .results"), ".answer")
    start()
    until(page, lambda d: "Answered in" in css(d, f"#tab-{panel} .status").text)
    answers = page.find_elements("css selector", f"#tab-{panel} .answer")
    think = page.find_elements("css selector", f"#tab-{panel} .think-text")
    return (think[-1].get_attribute("textContent") if think else "", answers[-1].get_attribute("textContent"),
            page.execute_script("return window.__seen.lengths"))


def test_chat_answer_streams_in_and_is_the_apis(page: Any, server: ServerThread) -> None:
    form = tab(page, "chat")
    fill(form, max_tokens=24)
    box = css(page, "#chat-input")

    def send(text: str) -> Callable[[], None]:
        return lambda: (box.send_keys(text), box.send_keys("\n"))

    think, answer, lengths = streamed_answer(page, "chat", send("Hello there"))
    api = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 24, "temperature": 0,
        "repetition_penalty": 1.0, "think": False}).json()["choices"][0]["message"]
    assert answer == api["content"] and answer and think == ""
    grew = [n for i, n in enumerate(lengths) if n and (i == 0 or n != lengths[i - 1])]
    assert len(grew) >= 2 and grew == sorted(grew) and grew[-1] == len(answer), lengths  # it grew as it streamed
    assert css(page, "#tab-chat .message.user").text == "Hello there"

    css(page, "#form-chat .clear").click()
    fill(form, think=True)
    think, answer, _ = streamed_answer(page, "chat", send("Why is the sky blue?"))
    api = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 24, "think": True}).json()
    message = api["choices"][0]["message"]
    assert (think, answer) == (message.get("reasoning_content") or "", message["content"])
    assert think or answer
    assert css(page, "#tab-chat details.think").get_attribute("hidden") == (None if think else "true")


def test_image_to_text_streams_the_answer(page: Any, server: ServerThread, tmp_path: Path) -> None:
    form = tab(page, "img2text")
    form.find_element("css selector", "input[type=file]").send_keys(str(png_file(tmp_path, 32, 32)))
    fill(form, max_tokens=8)
    think, answer, lengths = streamed_answer(page, "img2text", form.find_element("css selector", "button.run").click)
    url = "data:image/png;base64," + base64.b64encode(png_file(tmp_path, 32, 32).read_bytes()).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in this picture?"}]
    api = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": parts}], "max_tokens": 8}).json()["choices"][0]["message"]
    assert answer == api["content"] and lengths
    assert css(page, "#tab-img2text a.download").get_attribute("download") == "bagel-answer.txt"


def test_with_a_key_the_page_asks_for_it(browser: Any, keyed: ServerThread) -> None:
    page = open_page(browser, keyed.url, ready=False)
    page.execute_script("sessionStorage.clear()")
    page.refresh()
    banner = until(page, lambda d: css(d, "#banner").is_displayed() and css(d, "#banner"))
    assert "needs an API key" in banner.text and "401" in banner.text
    assert not css(page, "#form-text2img button.run").is_enabled()
    key = css(page, "#api-key")
    key.send_keys("wrong\n")
    until(page, lambda d: "was refused" in css(d, "#banner").text)
    key.clear()
    key.send_keys(KEY + "\n")
    until(page, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "true")
    assert not css(page, "#banner").is_displayed()
    assert page.execute_script("return sessionStorage.getItem('bagel-serve-api-key')") == KEY
    form = css(page, "#form-text2img")
    fill(form, size="32x32", num_inference_steps=2)
    form.find_element("css selector", "button.run").click()
    assert shown_image(page, "text2img").size == (32, 32)  # the /v1 calls carried the key
    page.execute_script("sessionStorage.clear()")


def cancelled_image_requests(server: ServerThread) -> float:
    line = 'bagel_serve_requests_total{endpoint="images_generations",modality="text2img",status="499"}'
    found = [x for x in httpx.get(server.url + "/metrics").text.splitlines() if x.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


def test_stop_cancels_the_request_in_the_engine(page: Any, server: ServerThread, engine_idle: Any) -> None:
    before = cancelled_image_requests(server)
    form = css(page, "#form-text2img")
    fill(form, size="32x32", num_inference_steps=1000)
    form.find_element("css selector", "button.run").click()
    until(page, lambda d: "Denoising: step" in css(d, "#tab-text2img .status").text)
    css(page, "#tab-text2img button.stop").click()
    until(page, lambda d: "Stopped after" in css(d, "#tab-text2img .status").text)
    assert css(page, "#tab-text2img button.run").is_enabled()
    assert not page.find_elements("css selector", "#tab-text2img .slot")  # no image will come
    engine_idle.wait()  # its KV blocks are freed
    assert cancelled_image_requests(server) == before + 1  # it ended as a cancelled stream, not a finished one
