"""The chat's image: local files and http(s) URLs, a time limit, the one image policy and one-line errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from serve_helpers import BIG_PNG, OK_PNG, SMALL_LIMIT, closed_port, png_bytes

from llava_stf.data.images import IMAGE_TOO_LARGE, ImageLimits
from llava_stf.serve.images import ImageSourceError, decode_image, download, is_url, open_image_source


def small() -> ImageLimits:
    return ImageLimits(max_bytes=SMALL_LIMIT)


def test_local_file_and_url_give_the_same_rgb_pixels(image_file, image_server) -> None:
    local = open_image_source(str(image_file))
    remote = open_image_source(f"{image_server}/ok.png", timeout=5, limits=small())
    assert local.mode == remote.mode == "RGB" and local.size == (20, 16)
    assert np.array_equal(np.asarray(local), np.asarray(remote))


def test_missing_and_corrupt_files_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(ImageSourceError, match="image file not found: .*nope.png"):
        open_image_source(str(tmp_path / "nope.png"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(OK_PNG[: len(OK_PNG) // 2])  # a PNG cut in half
    with pytest.raises(ImageSourceError, match="bad.png") as caught:
        open_image_source(str(bad))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("route", ["/big.png", "/big-stream.png"])  # refused from the header / while reading
def test_downloads_over_the_byte_limit_are_refused(image_server, route) -> None:
    with pytest.raises(ImageSourceError, match=f"limit of {SMALL_LIMIT} bytes"):
        download(image_server + route, timeout=5, max_bytes=SMALL_LIMIT)
    assert download(image_server + route, timeout=5, max_bytes=len(BIG_PNG)) == BIG_PNG  # the limit is exact


def test_a_server_that_never_answers_times_out(silent_server) -> None:
    with pytest.raises(ImageSourceError, match=r"timed out after 0.3 s downloading http://127\.0\.0\.1:\d+/slow.png"):
        open_image_source(silent_server, timeout=0.3)


def test_http_errors_refused_connections_and_non_images(image_server) -> None:
    with pytest.raises(ImageSourceError, match="answered HTTP 404"):
        open_image_source(f"{image_server}/missing.png", timeout=5)
    with pytest.raises(ImageSourceError, match="/text is not a readable image"):
        open_image_source(f"{image_server}/text", timeout=5)
    with pytest.raises(ImageSourceError, match="cannot download .*refused"):
        open_image_source(f"http://127.0.0.1:{closed_port()}/x.png", timeout=5)
    with pytest.raises(ImageSourceError, match="unsupported URL scheme"):
        open_image_source("ftp://127.0.0.1/x.png")
    assert is_url("HTTPS://example.org/a.png") and not is_url("photos/http.png")


def test_the_byte_limit_of_the_policy_applies_to_files_and_urls_alike(tmp_path, image_server) -> None:
    """Fails before issue 12: a local file had no byte limit, and a URL's limit was a separate setting."""
    big = tmp_path / "big.png"
    big.write_bytes(BIG_PNG)
    with pytest.raises(
        ImageSourceError, match=rf"image file '.*big\.png' is {len(BIG_PNG)} bytes > {SMALL_LIMIT}"
    ) as file:
        open_image_source(str(big), limits=small())
    with pytest.raises(ImageSourceError, match=f"over the limit of {SMALL_LIMIT} bytes") as url:
        open_image_source(f"{image_server}/big.png", timeout=5, limits=small())
    assert file.value.reason == url.value.reason == IMAGE_TOO_LARGE
    assert open_image_source(str(big), limits=ImageLimits(max_bytes=len(BIG_PNG))).size == (64, 64)  # exact limit


def test_one_set_of_defaults() -> None:
    """Fails before issue 12: downloads had their own 20 MiB default (serve.images.DEFAULT_MAX_BYTES)."""
    import inspect

    from llava_stf.serve.cli import build_parser

    args = build_parser().parse_args(["--model-path", "x"])
    limits = ImageLimits()
    assert (args.max_image_bytes, args.max_image_pixels, args.max_aspect_ratio) == (
        limits.max_bytes,
        limits.max_pixels,
        limits.max_aspect_ratio,
    )
    assert inspect.signature(download).parameters["max_bytes"].default == limits.max_bytes


def test_decoded_downloads_get_the_training_loader_checks() -> None:
    with pytest.raises(ImageSourceError, match="strip.png is 100x1, aspect ratio > 50"):
        decode_image(png_bytes(0, (100, 1)), "strip.png", ImageLimits(max_aspect_ratio=50))
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red: becomes white, as in training
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue(), "clear.png")
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (255, 255, 255)
