"""Remake docs/playground.png: the playground after a text→image on the demo model, in the same headless
Chromium as tests/test_playground.py (Debian's chromium + chromium-driver; `bagel_serve.testing.browser`).

    python scripts/playground_screenshot.py [--output docs/playground.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bagel_serve import Omni
from bagel_serve.serving.run import ServerThread
from bagel_serve.serving.settings import ServerSettings
from bagel_serve.testing.browser import headless_chromium
from bagel_serve.testing.demo import DEMO_MODEL

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1280, 860


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, default=ROOT / "docs" / "playground.png")
    args = ap.parse_args()
    from selenium.webdriver.support.ui import WebDriverWait

    with Omni(DEMO_MODEL, device="cpu", deploy_config="bagel_single_stage.yaml") as omni:
        server = ServerThread(omni, ServerSettings(port=0, served_model_name=DEMO_MODEL), DEMO_MODEL).start()
        browser = headless_chromium(WIDTH, HEIGHT)
        try:
            browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})
            browser.get(server.url + "/")
            wait = WebDriverWait(browser, 120, poll_frequency=0.05)
            wait.until(lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "true")
            form = browser.find_element("id", "form-text2img")
            for name, value in (("num_inference_steps", "12"), ("seed", "42")):
                field = form.find_element("name", name)
                field.clear()
                field.send_keys(value)
            form.find_element("css selector", "button.run").click()
            wait.until(lambda d: "image in" in d.find_element("css selector", "#tab-text2img .status").text)
            browser.execute_script("window.scrollTo(0, 0)")
            args.output.parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(args.output))
        finally:
            browser.quit()
            server.stop()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
