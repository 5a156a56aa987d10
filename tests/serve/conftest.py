"""Fixtures for the chat CLI tests: a tiny checkpoint, image files, and two local HTTP servers on 127.0.0.1.

``image_server`` serves a PNG (``/ok.png``), a PNG larger than the tests' byte limit with and without a
``Content-Length`` (``/big.png``, ``/big-stream.png``), a non-image (``/text``) and a 404. ``silent_server`` accepts
connections and never answers, to exercise download time limits; it holds each connection for a bounded time and
stops by itself.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from serve_helpers import BIG_PNG, OK_PNG

from llava_stf.testing import save_tiny_checkpoint


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory) -> Path:
    """A tiny MBTF+STF checkpoint (template vicuna_v1, image mode pad), saved once per session."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "llava-stf-tiny")


@pytest.fixture(scope="session")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "photo.png"
    path.write_bytes(OK_PNG)
    return path


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes, so /big-stream.png needs no length

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        routes = {"/ok.png": OK_PNG, "/big.png": BIG_PNG, "/big-stream.png": BIG_PNG, "/text": b"hello"}
        body = routes.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain" if self.path == "/text" else "image/png")
        if self.path != "/big-stream.png":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture(scope="session")
def image_server():
    """Base URL of an HTTP server on 127.0.0.1 serving the routes above (shut down after the session)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent_server():
    """URL of a server that accepts connections and never answers; it stops after 20 s at most, or at teardown."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        deadline = time.monotonic() + 20.0
        while not stop.is_set() and time.monotonic() < deadline:
            ready, _, _ = select.select([listener], [], [], 0.05)
            if ready:
                held.append(listener.accept()[0])  # read nothing, answer nothing
        for connection in held:
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/slow.png"
    stop.set()
    thread.join(5)
    listener.close()
