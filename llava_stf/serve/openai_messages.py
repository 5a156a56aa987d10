"""OpenAI chat messages -> the conversation the checkpoint's template renders, and the request's image.

Rules (each broken one is a 400 naming the message): ``system`` / ``developer`` messages come first and together
replace the template's system prompt; the rest start with ``user``, end with ``user`` and alternate (consecutive
messages of one role are joined with a newline, as are the text parts of one message). A request holds at most one
image (the ``Generator`` takes one ``<image>`` per request, as LLaVA-1.5 was trained): its tag goes in front of the
text of the turn that holds it (``"<image>\\n" + text``, as ``Request.single`` and LLaVA-1.5's evaluation), so a
one-question request is exactly the prompt ``python -m llava_stf.eval`` builds. Special-token strings typed into a
message (``</s>``, ``<image>``) are removed, as the chat CLI does: the tokenizer would read them as control tokens.

Images are ``http(s)://`` URLs (downloaded with the chat CLI's time and size limits, ``serve.images``) or
``data:image/...;base64,...`` URIs (decoded by ``data.images.decode_image_bytes`` under the same ``ImageLimits``).
Bad base64, bytes that are not an image, an image over the limits (a decompression bomb's header is refused before
decoding), an unreachable URL: all 400.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from ..data.conversation import GPT, HUMAN, IMAGE_TOKEN, Turn
from ..data.images import IMAGE_TOO_LARGE, ImageLimits
from .images import ImageSourceError, decode_image, is_url, open_image_source
from .openai_schema import ApiError, AssistantMessage, ImagePart, Message, SystemMessage, TextPart

_DATA_URI = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.DOTALL)


@dataclass(frozen=True)
class Conversation:
    """What the messages say, before the image is loaded."""

    system: str | None  # replaces the template's system prompt; None: the checkpoint's own
    turns: tuple[Turn, ...]  # human / gpt alternating, ending with human; the image's turn starts with "<image>\n"
    image_url: str | None  # the one image, if any
    image_param: str | None  # where it was (``messages[0].content[1].image_url.url``), for errors


def to_conversation(messages: Sequence[Message], special_tokens: Sequence[str] = ()) -> Conversation:
    """The conversation of ``messages``; ``special_tokens`` are removed from every text.

    Raises:
        ApiError: 400 for a misplaced system message, a broken alternation, no final user message or several images.
    """
    system: list[str] = []
    merged: list[tuple[str, list[str], int]] = []  # (role, texts, index of its first message)
    images: list[tuple[str, str, int]] = []  # (url, param, turn index)
    for i, message in enumerate(messages):
        if isinstance(message, SystemMessage):
            if merged:
                raise ApiError(
                    400, "system messages must come before the user and assistant messages", f"messages[{i}]"
                )
            system.append(_clean(_text(message.content), special_tokens))
            continue
        role = GPT if isinstance(message, AssistantMessage) else HUMAN
        if not merged or merged[-1][0] != role:
            merged.append((role, [], i))
        texts = merged[-1][1]
        parts = [TextPart(type="text", text=message.content or "")] if not isinstance(message.content, list) else []
        for j, part in enumerate(message.content if isinstance(message.content, list) else parts):
            if isinstance(part, ImagePart):
                images.append((part.image_url.url, f"messages[{i}].content[{j}].image_url.url", len(merged) - 1))
            else:
                texts.append(_clean(part.text, special_tokens))
    if not merged or merged[0][0] != HUMAN:
        raise ApiError(400, "the conversation must start with a user message (after any system messages)", "messages")
    if merged[-1][0] != HUMAN:
        raise ApiError(400, "the last message must be a user message: it is the question answered", "messages")
    if len(images) > 1:
        where = ", ".join(param for _, param, _ in images)
        raise ApiError(
            400, f"a request takes at most one image, got {len(images)} ({where})", "messages", "too_many_images"
        )
    turns = []
    for index, (role, texts, _) in enumerate(merged):
        text = "\n".join(t for t in texts if t)
        if images and images[0][2] == index:
            text = f"{IMAGE_TOKEN}\n{text}"
        turns.append(Turn(role, text))
    url, param = (images[0][0], images[0][1]) if images else (None, None)
    return Conversation("\n".join(system) if system else None, tuple(turns), url, param)


def _text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "\n".join(part.text for part in content)


def _clean(text: str, special_tokens: Sequence[str]) -> str:
    for token in special_tokens:
        text = text.replace(token, "")
    return text.strip()


def load_image(url: str, param: str, timeout: float, limits: ImageLimits, fetch_urls: bool = True) -> Image.Image:
    """The image at ``url`` (``http(s)://`` or a base64 ``data:image/...`` URI) as RGB.

    Args:
        fetch_urls: ``False``: refuse ``http(s)://`` URLs without any request (the server then never connects to
            other hosts on a client's behalf).

    Raises:
        ApiError: 400 for another scheme, a malformed data URI, bad base64, bytes that are not an image, an image
            over ``limits``, a download that fails or times out, or a URL when ``fetch_urls`` is off.
    """
    try:
        if url.startswith("data:"):
            return decode_image(_data_uri_bytes(url, param, limits), "the data URI image", limits)
        if is_url(url) and not fetch_urls:
            raise ApiError(
                400,
                f"{param}: this server does not fetch image URLs (started with --no-image-urls); send the image as a "
                "data:image/...;base64 URI",
                param,
                "invalid_image_url",
            )
        if is_url(url):
            return open_image_source(url, timeout, limits)
    except ImageSourceError as err:
        code = "image_too_large" if err.reason == IMAGE_TOO_LARGE else "invalid_image"
        message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the bytes", str(err))  # PIL names its file object
        raise ApiError(400, f"{param}: {message}", param, code) from None
    raise ApiError(
        400, f"{param}: only http(s):// URLs and data:image/...;base64 URIs are accepted", param, "invalid_image_url"
    )


def _data_uri_bytes(url: str, param: str, limits: ImageLimits) -> bytes:
    match = _DATA_URI.fullmatch(url)
    if match is None:
        raise ApiError(400, f"{param}: a malformed data URI (expected data:image/<type>;base64,<data>)", param)
    mime, params = match["mime"].strip().lower(), match["params"].lower().split(";")
    if not mime.startswith("image/"):
        raise ApiError(400, f"{param}: the data URI's media type is {mime or 'missing'!r}, not image/*", param)
    if "base64" not in (p.strip() for p in params):
        raise ApiError(400, f"{param}: the data URI must be base64-encoded (data:{mime};base64,...)", param)
    data = re.sub(r"\s+", "", match["data"])
    if len(data) * 3 // 4 > limits.max_bytes + 2:  # refused before decoding
        raise ApiError(
            400,
            f"{param}: the image is about {len(data) * 3 // 4} bytes > {limits.max_bytes} bytes",
            param,
            "image_too_large",
        )
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, f"{param}: the data URI is not valid base64: {err}", param, "invalid_image") from None


__all__ = ["Conversation", "load_image", "to_conversation"]
