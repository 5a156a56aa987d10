"""The web demo in a real headless browser: Debian's chromium driven by Selenium through chromium-driver.

The demo runs as its own process (``python -m llava_stf.serve.web``) on a free port of 127.0.0.1, on a tiny checkpoint
saved for the test, and is always stopped. The browser loads the page, is refused a file that is not an image (the
reason is shown on the page), uploads an image, asks two questions (Send, then Enter) and watches each answer stream
in (a ``MutationObserver`` records every state of the answer bubble) until its ``image tokens: ...`` line appears.
The browser and its driver are the system's (``/usr/bin/chromium``, ``/usr/bin/chromedriver``, from apt: ``chromium
chromium-driver``); Selenium Manager, which would download a browser, is never called. Without them the test skips.

``LLAVA_STF_SCREENSHOT=PATH`` also saves the final page there; ``LLAVA_STF_WEB_MODEL=CKPT`` and
``LLAVA_STF_WEB_IMAGE=FILE`` run it on another checkpoint and image. ``docs/serve/web-demo.png`` was made on the demo
checkpoint (``python -m llava_stf.demo``) and one of its evaluation images::

    LLAVA_STF_SCREENSHOT=docs/serve/web-demo.png LLAVA_STF_WEB_MODEL=playground/demo/mbtf_stf-seed0/stage2 \
    LLAVA_STF_WEB_IMAGE=playground/demo/synthetic/images/eval_000000.png \
    python -m pytest tests/serve/test_web_browser.py
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from serve_helpers import closed_port, png_bytes

from llava_stf.testing import save_tiny_checkpoint

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
QUESTIONS = [
    "What color is the square? Answer the question using a single word or phrase.",
    "How many shapes are there? Answer the question using a single word or phrase.",
]
REPO = Path(__file__).resolve().parents[2]
RECORDER = """
window.__states = [];
const chat = document.querySelector('#chat');
const record = () => {
  const bots = chat.querySelectorAll('[data-testid="bot"]');
  const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
  const last = window.__states[window.__states.length - 1];
  if (!last || last[0] !== bots.length || last[1] !== text) window.__states.push([bots.length, text]);
};
new MutationObserver(record).observe(chat, {subtree: true, childList: true, characterData: true});
"""


def _missing() -> str | None:
    """Why the test cannot run here, or ``None``."""
    absent = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    if absent:
        return f"{' and '.join(absent)} not installed (apt-get install chromium chromium-driver)"
    for module in ("selenium", "gradio"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[serve]')"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


@pytest.fixture
def demo_url(tmp_path):
    """The demo's URL, served by a child process on 127.0.0.1 that is stopped at teardown."""
    given = os.environ.get("LLAVA_STF_WEB_MODEL")
    model = Path(given).resolve() if given else save_tiny_checkpoint(tmp_path / "tiny")  # the demo runs in tmp_path
    port = closed_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    command = [sys.executable, "-m", "llava_stf.serve.web", "--model-path", str(model), "--port", str(port)]
    command += ["--device", "cpu", "--temperature", "0", "--max-new-tokens", "24"]
    log = (tmp_path / "demo.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, f"the demo exited: {(tmp_path / 'demo.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the demo did not answer within 90 s"
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()


@pytest.fixture
def browser(monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def no_download(*args, **kwargs):
        raise AssertionError("Selenium Manager was called: it would download a browser")

    monkeypatch.setattr(SeleniumManager, "binary_paths", no_download)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_chat_about_an_image_in_a_real_browser(demo_url, browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    browser.get(demo_url)
    upload = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#image input[type=file]"))
    assert browser.title == "LLaVA-STF"

    def status() -> str:
        return browser.find_element(By.ID, "status").text

    notes = tmp_path / "notes.png"
    notes.write_bytes(b"not an image")
    upload.send_keys(str(notes))
    wait.until(lambda b: "image refused" in status())
    assert status().startswith("error: image refused: notes.png is not a readable image"), status()

    image = Path(os.environ.get("LLAVA_STF_WEB_IMAGE") or tmp_path / "shapes.png").resolve()
    if not image.exists():
        image.write_bytes(png_bytes(4, (64, 64)))
    browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(image))
    wait.until(lambda b: status().startswith("image: "))
    assert status().startswith(f"image: {image.name}, ")

    browser.execute_script(RECORDER)
    box = browser.find_element(By.CSS_SELECTOR, "#question textarea")
    for turn, question in enumerate(QUESTIONS, 1):
        box.send_keys(question)
        if turn == 1:
            browser.find_element(By.ID, "send").click()
        else:
            box.send_keys(Keys.ENTER)
        wait.until(lambda b, n=turn: len(b.find_elements(By.CSS_SELECTOR, '#chat [data-testid="bot"]')) == n)
        bubble = browser.find_elements(By.CSS_SELECTOR, '#chat [data-testid="bot"]')[-1]
        wait.until(lambda b, bubble=bubble: "image tokens:" in bubble.text)
        final = bubble.text
        answer, stats = final.rsplit("\n", 1)
        assert answer.strip() and stats.startswith("image tokens: ") and " · new tokens: " in stats, final
        states = [text for count, text in browser.execute_script("return window.__states") if count == turn]
        # Streamed: the bubble showed answer text before the stats line came. (Not compared as prefixes of the
        # final text: the tiny model's random text can hold Markdown that renders differently once complete.)
        partial = [text for text in states if text not in ("", "…") and "image tokens:" not in text]
        assert partial, f"no partial answer was shown before the final one: {states}"
        user = browser.find_elements(By.CSS_SELECTOR, '#chat [data-testid="user"]')[-1]
        assert user.text.strip() == question and status() == ""
    screenshot = tmp_path / "web-demo.png"
    browser.save_screenshot(str(screenshot))
    if os.environ.get("LLAVA_STF_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["LLAVA_STF_SCREENSHOT"])
