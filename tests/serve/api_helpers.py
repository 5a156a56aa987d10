"""Helpers of the API tests: a real uvicorn server on 127.0.0.1 in a background thread, OpenAI clients with short
timeouts, images as data URIs, and an engine whose batches wait at a gate (to fill the queue deterministically)."""

from __future__ import annotations

import base64
import contextlib
import threading
import time
from collections.abc import Iterator

import openai
import uvicorn

from llava_stf.serve.api import ApiSettings, create_app
from llava_stf.serve.engine import ServeEngine

TIMEOUT = 30.0  # seconds: every client call ends (a hang fails the test instead of stalling it)
MODEL = "tiny"


@contextlib.contextmanager
def running(generator_or_engine, **settings) -> Iterator[tuple[str, object]]:
    """``(base URL, app)`` of the API served by uvicorn on 127.0.0.1 (a free port); stopped on exit."""
    app = create_app(generator_or_engine, ApiSettings(model_id=MODEL, **settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the server did not stop"


def client(base_url: str, api_key: str = "none", **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=TIMEOUT, **kwargs)


def async_client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=TIMEOUT)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(text: str, image_url: str | None = None) -> dict:
    """One user message: the image part (if any) first, then the text."""
    if image_url is None:
        return {"role": "user", "content": text}
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}],
    }


class GatedEngine(ServeEngine):
    """A ``ServeEngine`` whose batches wait for ``gate`` (set: run at once); ``entered`` counts batches started."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate, self.entered = threading.Event(), 0

    def run(self, jobs) -> None:
        self.entered += 1
        assert self.gate.wait(TIMEOUT), "the test never opened the gate"
        super().run(jobs)


def wait_for(condition, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)
