"""The chat's image: a local file or an http(s) URL, downloaded with a time limit, checked by the image policy, as RGB.

Both go through the one image policy of ``llava_stf.data.images`` (``ImageLimits``: bytes, pixels, aspect ratio; the
same checks and RGB conversion as training and evaluation): a file through ``load_image``, a download through
``decode_image_bytes``. A URL is fetched in a helper thread so the whole download, not only each wait for data, ends
within ``timeout`` seconds; it is refused as soon as its ``Content-Length`` or the bytes read exceed the policy's
``max_bytes``. Every failure is an ``ImageSourceError`` with a one-line message naming the file or URL, and the
reason (``reason``, one of ``data.images.IMAGE_REASONS`` when the image itself was refused).
"""

from __future__ import annotations

import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

from ..data.images import IMAGE_TOO_LARGE, MISSING_IMAGE, ImageLimits, decode_image_bytes, load_image
from ..data.tokenization import SkippedSample

DEFAULT_TIMEOUT = 10.0  # seconds for a whole download
URL_SCHEMES = ("http://", "https://")
_CHUNK = 64 * 1024


class ImageSourceError(ValueError):
    """The image cannot be had: missing or unreadable file, unreachable URL, timeout, over the image limits."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason  # a ``data.images`` skip reason (``image_too_large``, ...) when the image was refused


def is_url(source: str) -> bool:
    return source.lower().startswith(URL_SCHEMES)


def open_image_source(source: str, timeout: float = DEFAULT_TIMEOUT, limits: ImageLimits | None = None) -> Image.Image:
    """Load ``source`` (a path, or an ``http://`` / ``https://`` URL) as an RGB image.

    Args:
        source: A local image file or a URL.
        timeout: Seconds the whole download may take (URLs only).
        limits: The image policy (bytes, pixels, aspect ratio; default ``ImageLimits()``), checked before decoding.

    Raises:
        ImageSourceError: With a one-line reason.
    """
    limits = limits or ImageLimits()
    if is_url(source):
        return decode_image(download(source, timeout, limits.max_bytes), source, limits)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", source):
        raise ImageSourceError(f"unsupported URL scheme in {source!r}: only http:// and https:// are fetched")
    try:
        image, _ = load_image(Path(source).expanduser(), limits)
    except SkippedSample as err:
        if err.reason == MISSING_IMAGE:
            raise ImageSourceError(f"image file not found: {source}", err.reason) from None
        raise ImageSourceError(f"image file {_detail(err)}", err.reason) from None  # the detail names the file
    return image


def decode_image(data: bytes, name: str, limits: ImageLimits | None = None) -> Image.Image:
    """Decode image file bytes (checked against ``limits`` first) to RGB; ``name`` is for messages."""
    try:
        return decode_image_bytes(data, name, limits)[0]
    except SkippedSample as err:
        raise ImageSourceError(_detail(err), err.reason) from None


def _detail(err: SkippedSample) -> str:
    return str(err).removeprefix(f"{err.reason}: ")


def download(url: str, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = ImageLimits.max_bytes) -> bytes:
    """The body of ``url``, read within ``timeout`` seconds in all and refused beyond ``max_bytes``.

    Raises:
        ImageSourceError: Unreachable host, an HTTP error status, a timeout, or a body over ``max_bytes``.
    """
    outcome: dict[str, object] = {}

    def fetch() -> None:
        try:
            outcome["data"] = _read(url, timeout, max_bytes)
        except BaseException as err:  # handed to the caller's thread
            outcome["error"] = err

    worker = threading.Thread(target=fetch, name="image-download", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():  # the daemon thread ends by itself when its socket times out
        raise ImageSourceError(f"timed out after {timeout:g} s downloading {url}")
    if "error" in outcome:
        raise _describe(outcome["error"], url, timeout)
    return outcome["data"]  # type: ignore[return-value]


def _read(url: str, timeout: float, max_bytes: int) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "llava_stf-chat"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise ImageSourceError(
                f"{url} is {int(declared)} bytes, over the limit of {max_bytes} bytes", IMAGE_TOO_LARGE
            )
        chunks, size = [], 0
        while chunk := response.read1(_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise ImageSourceError(f"{url} sent more than the limit of {max_bytes} bytes", IMAGE_TOO_LARGE)
            chunks.append(chunk)
    return b"".join(chunks)


def _describe(err: BaseException, url: str, timeout: float) -> ImageSourceError:
    if isinstance(err, ImageSourceError):
        return err
    if isinstance(err, urllib.error.HTTPError):
        return ImageSourceError(f"{url} answered HTTP {err.code} {err.reason}")
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError
        return ImageSourceError(f"timed out after {timeout:g} s downloading {url}")
    return ImageSourceError(f"cannot download {url}: {reason}")


__all__ = [
    "DEFAULT_TIMEOUT",
    "ImageSourceError",
    "decode_image",
    "download",
    "is_url",
    "open_image_source",
]
