"""Loading images safely: every file either becomes an RGB ``PIL.Image`` or a ``SkippedSample`` with a reason.

LLaVA calls ``Image.open(path).convert("RGB")`` and lets anything else crash the run (or silently mangle the image:
PIL clips a 16-bit image to 255, and drops the alpha channel, keeping whatever colour hides under transparent
pixels). Here the conversions that are safe are made explicitly (``to_rgb``):

- ``1``, ``L``, ``P`` (no transparency), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``: PIL's own conversion;
- anything with alpha (``RGBA``, ``LA``, ``PA``, ``P`` with a transparency key, ...): composited onto a white
  background (LLaVA keeps the hidden colour, usually black);
- 16/32-bit integer and float greyscale (``I;16*``, ``I``, ``F``): rescaled to 8 bits over the type's range
  (65535 for 16-bit data), never clipped.

Everything else is a counted skip: missing file (``missing_image``), not an image or unreadable
(``unreadable_image``), a file that ends early (``truncated_image``), or an image over the limits
(``image_too_large``).

The image policy: :class:`ImageLimits` is the one set of limits for every image the package reads, for training
(``data.dataset``, ``data.validate``), evaluation and the chat (local files and downloaded URLs, ``serve.images``).
An image is refused, before it is decoded, when its file is over ``max_bytes`` (64 MiB: the file size, or for a
download the bytes received, so a download stops there), when its header says it has over ``max_pixels`` pixels
(64 million: an 8000 x 8000 photo passes; PIL's own decompression-bomb limit of ~179M is not relied on) or when its
long side is over ``max_aspect_ratio`` (50) times its short side (the resize to the vision tower's square input would
explode or leave a line of pixels). The defaults are chosen so that no ordinary photograph, scan or screenshot is
refused; each entry point lets the user change them (the chat: ``--max-image-bytes``, ``--max-image-pixels``,
``--max-aspect-ratio``). ``load_image`` checks a file, ``decode_image_bytes`` the bytes of a download, with the same
code and the same messages.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from .tokenization import SkippedSample

MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
TRUNCATED_IMAGE = "truncated_image"
IMAGE_TOO_LARGE = "image_too_large"
IMAGE_REASONS = (MISSING_IMAGE, UNREADABLE_IMAGE, TRUNCATED_IMAGE, IMAGE_TOO_LARGE)

BACKGROUND = (255, 255, 255)  # what transparent pixels become
_HIGH_DEPTH = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": None, "F": None}


@dataclass(frozen=True)
class ImageLimits:
    """The image policy: what an image may be before it is refused (``image_too_large``); see the module docstring."""

    max_pixels: int = 64_000_000  # width * height, read from the header (PIL's own bomb limit is ~179M)
    max_aspect_ratio: float = 50.0  # long side / short side; beyond this the resize to CLIP size explodes
    max_bytes: int = 64 * 1024 * 1024  # the file's size, or the bytes a download may receive

    def __post_init__(self) -> None:
        bad = [
            f"{name}={getattr(self, name)!r} (> 0)"
            for name in ("max_pixels", "max_bytes")
            if not getattr(self, name) > 0
        ]
        if not self.max_aspect_ratio >= 1:  # also refuses NaN
            bad.append(f"max_aspect_ratio={self.max_aspect_ratio!r} (long side / short side, >= 1)")
        if bad:
            raise ValueError(f"invalid image limits: {', '.join(bad)}")

    def check_bytes(self, size: int, name: str) -> None:
        """Raise ``image_too_large`` when a file or download of ``size`` bytes is over ``max_bytes``."""
        if size > self.max_bytes:
            raise SkippedSample(IMAGE_TOO_LARGE, f"{name} is {size} bytes > {self.max_bytes} bytes")

    def check_size(self, width: int, height: int, name: str) -> None:
        """Raise ``unreadable_image`` for an empty image, ``image_too_large`` for one over the pixel or ratio limit."""
        if width < 1 or height < 1:
            raise SkippedSample(UNREADABLE_IMAGE, f"{name} has size {width}x{height}")
        if width * height > self.max_pixels:
            raise SkippedSample(
                IMAGE_TOO_LARGE, f"{name} is {width}x{height} = {width * height} pixels > {self.max_pixels}"
            )
        if max(width, height) / min(width, height) > self.max_aspect_ratio:
            ratio = f"aspect ratio > {self.max_aspect_ratio:g}"
            raise SkippedSample(IMAGE_TOO_LARGE, f"{name} is {width}x{height}, {ratio}")


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any PIL mode to RGB; return the image and the source mode when a conversion was made.

    Args:
        image: a loaded image in any mode.

    Returns:
        ``(rgb_image, converted_from)``; ``converted_from`` is ``None`` for RGB input.

    Raises:
        SkippedSample: ``unreadable_image`` for a mode with no safe conversion.
    """
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "La":  # premultiplied; PIL only converts it to LA
        image = image.convert("LA")
    if image.mode in _HIGH_DEPTH:
        return _rescale_high_depth(image).convert("RGB"), mode
    try:
        if "A" in image.mode or image.mode == "RGBa":  # alpha (straight or premultiplied): composite on white
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
            return Image.alpha_composite(canvas, rgba).convert("RGB"), mode
        return image.convert("RGB"), mode
    except (ValueError, OSError) as err:
        raise SkippedSample(UNREADABLE_IMAGE, f"no RGB conversion for PIL mode {mode!r}: {err}") from None


def _rescale_high_depth(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit ``L`` over the data type's range (not clipped at 255)."""
    pixels = np.asarray(image, dtype=np.float64)
    top = _HIGH_DEPTH[image.mode]
    if top is None:  # "I" (PNG 16-bit often decodes to it) and "F": use the 16-bit range when values exceed 8 bits
        low = min(float(pixels.min()), 0.0)
        high = float(pixels.max())
        top = 255.0 if high <= 255 else (65535.0 if high <= 65535 else high)
        pixels = pixels - low
    return Image.fromarray(np.clip(np.round(pixels * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def load_image(path: str | os.PathLike, limits: ImageLimits | None = None) -> tuple[Image.Image, str | None]:
    """Open, check and decode one image file; convert it to RGB.

    Args:
        path: the image file.
        limits: the image policy, checked on the file size and the header before decoding (default
            ``ImageLimits()``).

    Returns:
        ``(rgb_image, converted_from)`` as :func:`to_rgb`.

    Raises:
        SkippedSample: with reason ``missing_image``, ``unreadable_image``, ``truncated_image`` or
            ``image_too_large``.
    """
    path, limits = Path(path), limits or ImageLimits()
    name = repr(str(path))
    if not path.is_file():
        raise SkippedSample(MISSING_IMAGE, f"no file {name}")
    try:
        size = path.stat().st_size
    except OSError as err:
        raise SkippedSample(UNREADABLE_IMAGE, f"{name} cannot be read: {err.strerror or err}") from None
    limits.check_bytes(size, name)
    return _decode(path, name, limits)


def decode_image_bytes(data: bytes, name: str, limits: ImageLimits | None = None) -> tuple[Image.Image, str | None]:
    """:func:`load_image` for the bytes of an image file held in memory (a download); ``name`` is for messages."""
    limits = limits or ImageLimits()
    limits.check_bytes(len(data), name)
    return _decode(io.BytesIO(data), name, limits)


def _decode(source: Path | BinaryIO, name: str, limits: ImageLimits) -> tuple[Image.Image, str | None]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            image = Image.open(source)
    except Image.DecompressionBombError as err:
        raise SkippedSample(IMAGE_TOO_LARGE, f"{name}: {err}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise SkippedSample(UNREADABLE_IMAGE, f"{name} is not a readable image: {err}") from None
    with image:
        limits.check_size(*image.size, name)
        try:
            image.load()
        except OSError as err:
            reason = TRUNCATED_IMAGE if "truncated" in str(err) or "broken data stream" in str(err) else None
            raise SkippedSample(reason or UNREADABLE_IMAGE, f"{name} cannot be decoded: {err}") from None
        except (ValueError, SyntaxError, EOFError) as err:
            raise SkippedSample(UNREADABLE_IMAGE, f"{name} cannot be decoded: {err}") from None
        rgb, converted_from = to_rgb(image)
        if rgb is image:
            rgb = image.copy()  # detach from the file handle closed by the with-block
        return rgb, converted_from


__all__ = [
    "BACKGROUND",
    "IMAGE_REASONS",
    "IMAGE_TOO_LARGE",
    "MISSING_IMAGE",
    "TRUNCATED_IMAGE",
    "UNREADABLE_IMAGE",
    "ImageLimits",
    "decode_image_bytes",
    "load_image",
    "to_rgb",
]
