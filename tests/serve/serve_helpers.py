"""Shared data for the chat CLI tests (imported by ``conftest.py`` and the test files of this folder)."""

from __future__ import annotations

import io
import socket

from llava_stf.testing import make_image

SMALL_LIMIT = 2000  # bytes: the byte limit the tests pass; /ok.png is below it, /big*.png above


def png_bytes(seed: int, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    make_image(seed, size).save(buffer, format="PNG")
    return buffer.getvalue()


OK_PNG = png_bytes(1, (20, 16))  # about 1 KB of noise
BIG_PNG = png_bytes(2, (64, 64))  # about 12 KB of noise
assert len(OK_PNG) < SMALL_LIMIT < len(BIG_PNG)


def closed_port() -> int:
    """A local port with nothing listening on it (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
