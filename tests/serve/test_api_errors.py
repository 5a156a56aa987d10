"""Every bad request gets an OpenAI-style JSON error with a 4xx status from the real server: never a 500, never a
hang (every call has a client timeout)."""

from __future__ import annotations

import base64
import struct
import zlib

import httpx
import openai
import pytest
from api_helpers import MODEL, TIMEOUT, client, data_uri, running, user
from serve_helpers import OK_PNG, closed_port

from llava_stf.generation import Generator
from llava_stf.serve.api_http import validation_error

pytestmark = pytest.mark.slow
IMAGE = data_uri(OK_PNG)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says ``width x height`` (its data is a 1x1 image's): a decompression bomb's signature."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def url(serve_checkpoint):
    with running(Generator.from_pretrained(serve_checkpoint, "cpu"), image_timeout=1.0, max_tokens=64) as (base, _):
        yield base


def body(*messages, **fields) -> dict:
    return {"model": MODEL, "messages": list(messages) or [user("Hi")], "max_tokens": 4, **fields}


def image_message(url_: str) -> dict:
    return user("What is shown?", url_)


BAD_BODIES = {
    "unknown top-level field": (body(foo=1), "Unrecognized request argument supplied: foo", "foo"),
    "unknown message field": (body({"role": "user", "content": "Hi", "colour": "red"}), "colour", "messages[0].colour"),
    "unknown content part": (body({"role": "user", "content": [{"type": "audio", "audio": "x"}]}), "type", None),
    "unknown role": (body({"role": "tool", "content": "Hi"}), "role", None),
    "no messages": ({"model": MODEL}, "Field required", "messages"),
    "empty messages": (body(messages=[]), "messages", "messages"),
    "a list, not an object": ([1, 2], "valid dictionary", None),
    "bad base64": (body(image_message("data:image/png;base64,@@@not-base64@@@")), "not valid base64", None),
    "not an image": (body(image_message(data_uri(b"hello, world"))), "not a readable image: cannot identify", None),
    "a text data URI": (body(image_message(data_uri(OK_PNG, "text/plain"))), "not image/*", None),
    "a data URI without base64": (body(image_message("data:image/png,abc")), "base64-encoded", None),
    "a decompression bomb": (body(image_message(data_uri(png_claiming(10_000, 10_000)))), "pixels", None),
    "a huge bomb": (body(image_message(data_uri(png_claiming(30_000, 30_000)))), "decompression bomb", None),
    "two images": (
        body({"role": "user", "content": [*image_message(IMAGE)["content"], *image_message(IMAGE)["content"]]}),
        "at most one image",
        "messages",
    ),
    "images in two messages": (
        body(image_message(IMAGE), {"role": "assistant", "content": "ok"}, image_message(IMAGE)),
        "at most one image",
        "messages",
    ),
    "a prompt over the context": (body(user("red " * 5000)), "over the model's context", "messages"),
    "prompt + max_tokens over the context": (body(user("red " * 4040), max_tokens=64), "context length", "max_tokens"),
    "max_tokens 0": (body(max_tokens=0), "max_tokens", "max_tokens"),
    "max_tokens -1": (body(max_tokens=-1), "max_tokens", "max_tokens"),
    "max_tokens over the cap": (body(max_tokens=65), "max_tokens must be in [1, 64]", "max_tokens"),
    "max_completion_tokens 0": (body(max_completion_tokens=0, max_tokens=None), "in [1, 64]", "max_completion_tokens"),
    "temperature below 0": (body(temperature=-0.5), "temperature", "temperature"),
    "temperature above 2": (body(temperature=2.5), "temperature", "temperature"),
    "top_p 0": (body(top_p=0), "top_p", "top_p"),
    "n 2": (body(n=2), "not supported", "n"),
    "logprobs": (body(logprobs=True), "not supported", "logprobs"),
    "stream_options without stream": (body(stream_options={"include_usage": True}), "stream is true", "stream_options"),
    "five stop strings": (body(stop=list("abcde")), "up to 4", "stop"),
    "an empty stop string": (body(stop=[""]), "non-empty", "stop"),
    "an assistant message last": (body(user("Hi"), {"role": "assistant", "content": "Hello"}), "last message", None),
    "an assistant message first": (
        body({"role": "assistant", "content": "Hello"}, user("Hi")),
        "start with a user",
        None,
    ),
    "a system message after a user": (
        body(user("Hi"), {"role": "system", "content": "Be brief."}, user("Hi")),
        "system",
        None,
    ),
    "a file URL": (body(image_message("file:///etc/passwd")), "only http(s)", None),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_requests_get_a_400_openai_error(url, case) -> None:
    payload, fragment, param = BAD_BODIES[case]
    payload = {k: v for k, v in payload.items() if v is not None} if isinstance(payload, dict) else payload
    response = httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=TIMEOUT)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert fragment in error["message"] and "\n" not in error["message"]
    if param is not None:
        assert error["param"] == param


def test_malformed_json_is_a_400(url) -> None:
    for raw in (b'{"model": "tiny", "messages": [', b"not json at all", b""):
        response = httpx.post(
            f"{url}/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}, timeout=TIMEOUT
        )
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error", raw


def test_image_urls_that_fail_are_a_400_in_bounded_time(url, image_server, silent_server) -> None:
    cases = {
        f"http://127.0.0.1:{closed_port()}/x.png": "cannot download",
        f"{image_server}/missing.png": "HTTP 404",
        f"{image_server}/text": "not a readable image",
        silent_server: "timed out after 1 s",
    }
    for image_url, fragment in cases.items():
        response = httpx.post(f"{url}/v1/chat/completions", json=body(image_message(image_url)), timeout=TIMEOUT)
        assert response.status_code == 400 and fragment in response.json()["error"]["message"], response.text


def test_unknown_model_route_and_method_are_openai_errors(url) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client(url).chat.completions.create(model="gpt-4o", messages=[user("Hi")], max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and "tiny" in err.value.body["message"]
    for method, path, status in [("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)]:
        response = httpx.request(method, f"{url}{path}", timeout=TIMEOUT)
        assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_the_official_client_sees_the_error_body(url) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(url).chat.completions.create(model=MODEL, messages=[user("Hi")], max_tokens=4, extra_body={"foo": 1})
    assert err.value.status_code == 400 and err.value.body["param"] == "foo"


def test_a_bad_request_does_not_disturb_the_next(url) -> None:
    bad = data_uri(base64.b64decode(base64.b64encode(b"GIF89a broken")))
    assert httpx.post(f"{url}/v1/chat/completions", json=body(image_message(bad)), timeout=TIMEOUT).status_code == 400
    reply = client(url).chat.completions.create(model=MODEL, messages=[image_message(IMAGE)], max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_validation_errors_name_the_parameter_as_openai_does() -> None:
    content = ("body", "messages", 0, "user", "content")
    errors = [
        {"type": "string_type", "loc": (*content, "str"), "msg": "not a string"},
        {"type": "union_tag_invalid", "loc": (*content, "list[tagged-union[TextPart,ImagePart]]", 0), "msg": "bad"},
    ]
    error = validation_error(errors)  # the deepest error; union branches and role tags left out of the name
    assert (error.status, error.param, error.message) == (400, "messages[0].content[0]", "messages[0].content[0]: bad")


def test_a_body_over_the_limit_is_refused_with_413_whether_its_length_is_declared_or_streamed(serve_checkpoint):
    """Bodies larger than ``max_body_bytes`` never reach the JSON parser: a declared Content-Length or the bytes of a
    chunked upload decide; the error is OpenAI-style JSON and the server still answers afterwards."""
    big = {**body(), "padding": "x" * 5000}
    with running(Generator.from_pretrained(serve_checkpoint, "cpu"), max_body_bytes=2000) as (base, _):
        declared = httpx.post(f"{base}/v1/chat/completions", json=big, timeout=TIMEOUT)

        def chunks():
            payload = httpx.Request("POST", base, json=big).content
            for i in range(0, len(payload), 512):
                yield payload[i : i + 512]

        streamed = httpx.post(f"{base}/v1/chat/completions", content=chunks(), timeout=TIMEOUT)
        small = httpx.post(f"{base}/v1/chat/completions", json=body(), timeout=TIMEOUT)
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert "2000 bytes" in error["message"] and error["code"] == "request_too_large"
    assert small.status_code == 200 and small.json()["choices"][0]["message"]["content"] is not None
