"""The chat's image: a local file or an http(s) URL, downloaded with a time limit and a size limit, as RGB.

Local files go through ``llava_stf.data.images.load_image`` (the training loader: header size checks, safe RGB
conversion of alpha / palette / 16-bit images). A URL is fetched in a helper thread so the whole download, not only
each wait for data, ends within ``timeout`` seconds; it is refused as soon as its ``Content-Length`` or the bytes read
exceed ``max_bytes``, then decoded from memory with the same checks. Every failure is an ``ImageSourceError`` with a
one-line message naming the file or URL.
"""

from __future__ import annotations

import io
import re
import threading
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..data.images import MISSING_IMAGE, ImageLimits, load_image, to_rgb
from ..data.tokenization import SkippedSample

DEFAULT_TIMEOUT = 10.0  # seconds for a whole download
DEFAULT_MAX_BYTES = 20 * 1024 * 1024  # a downloaded image file may be at most this large
URL_SCHEMES = ("http://", "https://")
_CHUNK = 64 * 1024


class ImageSourceError(ValueError):
    """The image cannot be had: missing or unreadable file, unreachable URL, timeout, download too large."""


def is_url(source: str) -> bool:
    return source.lower().startswith(URL_SCHEMES)


def open_image_source(
    source: str,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    limits: ImageLimits | None = None,
) -> Image.Image:
    """Load ``source`` (a path, or an ``http://`` / ``https://`` URL) as an RGB image.

    Args:
        source: A local image file or a URL.
        timeout: Seconds the whole download may take (URLs only).
        max_bytes: Largest download accepted, in bytes (URLs only).
        limits: Pixel-count and aspect-ratio limits, read from the header before decoding.

    Raises:
        ImageSourceError: With a one-line reason.
    """
    if is_url(source):
        return decode_image(download(source, timeout, max_bytes), source, limits)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", source):
        raise ImageSourceError(f"unsupported URL scheme in {source!r}: only http:// and https:// are fetched")
    try:
        image, _ = load_image(Path(source).expanduser(), limits)
    except SkippedSample as err:
        if err.reason == MISSING_IMAGE:
            raise ImageSourceError(f"image file not found: {source}") from None
        raise ImageSourceError(f"image file {str(err).split(': ', 1)[-1]}") from None  # the detail names the file
    return image


def decode_image(data: bytes, name: str, limits: ImageLimits | None = None) -> Image.Image:
    """Decode image file bytes (checked against ``limits`` from the header first) to RGB; ``name`` is for messages."""
    limits = limits or ImageLimits()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            image = Image.open(io.BytesIO(data))
        width, height = image.size
        too_large = width * height > limits.max_pixels or max(width, height) > limits.max_aspect_ratio * min(
            width, height
        )
        if not too_large:
            image.load()
            return to_rgb(image)[0]
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise ImageSourceError(f"{name} is not a readable image: {err}") from None
    except SkippedSample as err:
        raise ImageSourceError(f"{name}: {err}") from None
    raise ImageSourceError(
        f"{name} is a {width}x{height} image: over {limits.max_pixels} pixels or an aspect ratio over "
        f"{limits.max_aspect_ratio:g}"
    )


def download(url: str, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
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
            raise ImageSourceError(f"{url} is {int(declared)} bytes, over the limit of {max_bytes} bytes")
        chunks, size = [], 0
        while chunk := response.read1(_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise ImageSourceError(f"{url} sent more than the limit of {max_bytes} bytes")
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
    "DEFAULT_MAX_BYTES",
    "DEFAULT_TIMEOUT",
    "ImageSourceError",
    "decode_image",
    "download",
    "is_url",
    "open_image_source",
]
