"""Loading training images safely: every file either becomes an RGB ``PIL.Image`` or a ``SkippedSample`` with a reason.

LLaVA calls ``Image.open(path).convert("RGB")`` and lets anything else crash the run (or silently mangle the image:
PIL clips a 16-bit image to 255, and drops the alpha channel, keeping whatever colour hides under transparent
pixels). Here the conversions that are safe are made explicitly (``to_rgb``):

- ``1``, ``L``, ``P`` (no transparency), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``: PIL's own conversion;
- anything with alpha (``RGBA``, ``LA``, ``PA``, ``P`` with a transparency key, ...): composited onto a white
  background (LLaVA keeps the hidden colour, usually black);
- 16/32-bit integer and float greyscale (``I;16*``, ``I``, ``F``): rescaled to 8 bits over the type's range
  (65535 for 16-bit data), never clipped.

Everything else is a counted skip: missing file (``missing_image``), not an image or unreadable
(``unreadable_image``), a file that ends early (``truncated_image``), or an image too large or too elongated to
preprocess without exhausting memory (``image_too_large``). The size is read from the header before decoding.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

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
    """What an image may look like before it is refused (``image_too_large``)."""

    max_pixels: int = 64_000_000  # width * height, read from the header (PIL's own bomb limit is ~179M)
    max_aspect_ratio: float = 50.0  # long side / short side; beyond this the resize to CLIP size explodes


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
        limits: size limits checked on the header before decoding (default ``ImageLimits()``).

    Returns:
        ``(rgb_image, converted_from)`` as :func:`to_rgb`.

    Raises:
        SkippedSample: with reason ``missing_image``, ``unreadable_image``, ``truncated_image`` or
            ``image_too_large``.
    """
    path, limits = Path(path), limits or ImageLimits()
    if not path.is_file():
        raise SkippedSample(MISSING_IMAGE, f"no file {str(path)!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            image = Image.open(path)
    except Image.DecompressionBombError as err:
        raise SkippedSample(IMAGE_TOO_LARGE, f"{str(path)!r}: {err}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise SkippedSample(UNREADABLE_IMAGE, f"{str(path)!r} is not a readable image: {err}") from None
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise SkippedSample(UNREADABLE_IMAGE, f"{str(path)!r} has size {width}x{height}")
        if width * height > limits.max_pixels:
            raise SkippedSample(
                IMAGE_TOO_LARGE, f"{str(path)!r} is {width}x{height} = {width * height} pixels > {limits.max_pixels}"
            )
        if max(width, height) / min(width, height) > limits.max_aspect_ratio:
            raise SkippedSample(
                IMAGE_TOO_LARGE,
                f"{str(path)!r} is {width}x{height}, aspect ratio > {limits.max_aspect_ratio:g}",
            )
        try:
            image.load()
        except OSError as err:
            reason = TRUNCATED_IMAGE if "truncated" in str(err) or "broken data stream" in str(err) else None
            raise SkippedSample(reason or UNREADABLE_IMAGE, f"{str(path)!r} cannot be decoded: {err}") from None
        except (ValueError, SyntaxError, EOFError) as err:
            raise SkippedSample(UNREADABLE_IMAGE, f"{str(path)!r} cannot be decoded: {err}") from None
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
    "load_image",
    "to_rgb",
]
