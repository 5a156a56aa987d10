"""Image loading: every broken file is a named skip, every odd mode is converted without mangling the pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from llava_stf.data.images import (
    IMAGE_TOO_LARGE,
    MISSING_IMAGE,
    TRUNCATED_IMAGE,
    UNREADABLE_IMAGE,
    ImageLimits,
    load_image,
    to_rgb,
)
from llava_stf.data.tokenization import SkippedSample
from llava_stf.testing import make_image


def reason_of(path, limits=None) -> str:
    with pytest.raises(SkippedSample) as info:
        load_image(path, limits)
    return info.value.reason


def test_rgb_jpeg_loads_unchanged(tmp_path):
    make_image(0, (48, 40)).save(tmp_path / "a.png")
    image, converted = load_image(tmp_path / "a.png")
    assert image.mode == "RGB" and image.size == (48, 40) and converted is None
    assert np.array_equal(np.asarray(image), np.asarray(make_image(0, (48, 40))))


def test_missing_file(tmp_path):
    assert reason_of(tmp_path / "nope.jpg") == MISSING_IMAGE


@pytest.mark.parametrize("content", [b"", b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_not_an_image(tmp_path, content):
    (tmp_path / "x.jpg").write_bytes(content)
    assert reason_of(tmp_path / "x.jpg") == UNREADABLE_IMAGE


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, fmt):
    path = tmp_path / f"t.{fmt.lower()}"
    make_image(1, (64, 64)).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert reason_of(path) in (TRUNCATED_IMAGE, UNREADABLE_IMAGE)
    if fmt == "JPEG":
        assert reason_of(path) == TRUNCATED_IMAGE


def test_corrupt_body_is_unreadable_not_a_crash(tmp_path):
    path = tmp_path / "c.png"
    make_image(2, (32, 32)).save(path)
    data = bytearray(path.read_bytes())
    data[60:120] = b"\xff" * 60  # inside the compressed image data
    path.write_bytes(bytes(data))
    assert reason_of(path) in (UNREADABLE_IMAGE, TRUNCATED_IMAGE)


def test_too_many_pixels_is_refused_from_the_header(tmp_path):
    make_image(0, (48, 40)).save(tmp_path / "big.png")
    assert reason_of(tmp_path / "big.png", ImageLimits(max_pixels=48 * 40 - 1)) == IMAGE_TOO_LARGE
    load_image(tmp_path / "big.png", ImageLimits(max_pixels=48 * 40))  # the limit itself is fine


def test_absurd_aspect_ratio_is_refused(tmp_path):
    Image.new("RGB", (400, 4)).save(tmp_path / "strip.png")
    assert reason_of(tmp_path / "strip.png") == IMAGE_TOO_LARGE
    load_image(tmp_path / "strip.png", ImageLimits(max_aspect_ratio=100))


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1"])
def test_plain_modes_convert_like_pil(tmp_path, mode):
    source = make_image(3, (20, 16), mode=mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    path = tmp_path / f"m.{fmt.lower()}"
    source.save(path, format=fmt)
    image, converted = load_image(path)
    assert image.mode == "RGB" and converted == Image.open(path).mode
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(path).convert("RGB")))


def test_rgba_transparency_becomes_white_not_the_hidden_colour(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (10, 200, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # transparent black: PIL's convert("RGB") would keep the black
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black over white
    rgba.save(tmp_path / "a.png")
    image, converted = load_image(tmp_path / "a.png")
    assert converted == "RGBA"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) in {(127, 127, 127), (128, 128, 128)}
    assert image.getpixel((2, 2)) == (10, 200, 30)


def test_palette_with_transparency_and_grey_alpha(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 250, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    image, _ = load_image(tmp_path / "p.png")
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((1, 1)) == (250, 0, 0)
    la = Image.new("LA", (2, 2), (50, 0))
    assert to_rgb(la)[0].getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    pixels = np.array([[0, 257 * 64], [257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "d.png")  # 16-bit greyscale PNG
    image, converted = load_image(tmp_path / "d.png")
    assert converted is not None and converted.startswith("I")
    assert [image.getpixel(xy)[0] for xy in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [0, 64, 128, 255]
    assert Image.open(tmp_path / "d.png").convert("RGB").getpixel((1, 0))[0] == 255  # what PIL alone would give


def test_float_image_in_unit_range_keeps_its_values():
    image = Image.fromarray(np.array([[0.0, 128.0], [255.0, 64.0]], dtype=np.float32), "F")
    rgb, converted = to_rgb(image)
    assert converted == "F" and [rgb.getpixel(xy)[0] for xy in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [0, 128, 255, 64]


# Issue 12: one image policy (bytes, pixels, aspect ratio) for training, evaluation and the chat. These fail before it:
# ImageLimits had no byte limit, and there was no loader for the bytes of a download.


def test_a_file_over_the_byte_limit_is_refused_before_decoding(tmp_path):
    make_image(0, (48, 40)).save(tmp_path / "a.png")
    size = (tmp_path / "a.png").stat().st_size
    with pytest.raises(SkippedSample, match=rf"'.*a\.png' is {size} bytes > {size - 1} bytes") as info:
        load_image(tmp_path / "a.png", ImageLimits(max_bytes=size - 1))
    assert info.value.reason == IMAGE_TOO_LARGE
    load_image(tmp_path / "a.png", ImageLimits(max_bytes=size))  # the limit itself is fine
    assert ImageLimits(1, 2.0) == ImageLimits(max_pixels=1, max_aspect_ratio=2.0)  # positional use keeps working


def test_bytes_in_memory_get_the_same_checks_and_conversion(tmp_path):
    from llava_stf.data.images import decode_image_bytes

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    data = (tmp_path / "clear.png").read_bytes()
    decoded, converted = decode_image_bytes(data, "clear.png")
    assert np.array_equal(np.asarray(decoded), np.asarray(load_image(tmp_path / "clear.png")[0]))
    assert converted == "RGBA" and decoded.getpixel((0, 0)) == (255, 255, 255)
    for limits, message in [
        (ImageLimits(max_bytes=len(data) - 1), f"clear.png is {len(data)} bytes"),
        (ImageLimits(max_pixels=15), "clear.png is 4x4 = 16 pixels > 15"),
    ]:
        with pytest.raises(SkippedSample, match=message) as info:
            decode_image_bytes(data, "clear.png", limits)
        assert info.value.reason == IMAGE_TOO_LARGE
    with pytest.raises(SkippedSample) as info:
        decode_image_bytes(b"hello", "text")
    assert info.value.reason == UNREADABLE_IMAGE


@pytest.mark.parametrize(
    "fields", [{"max_bytes": 0}, {"max_pixels": -1}, {"max_aspect_ratio": 0.5}, {"max_aspect_ratio": float("nan")}]
)
def test_limits_that_would_refuse_everything_are_an_error(fields):
    name = next(iter(fields))
    with pytest.raises(ValueError, match=f"invalid image limits: {name}="):
        ImageLimits(**fields)
