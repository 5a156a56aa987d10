"""The OpenAI chat-completions schema the API speaks: request models, response builders and the error format.

Requests follow the OpenAI API reference (https://platform.openai.com/docs/api-reference/chat/create) and are as
strict as it is: an unknown top-level field is refused ("Unrecognized request argument supplied: ...") and so is an
unknown field inside a message or content part. OpenAI parameters this server does not implement (``n`` > 1, penalties,
``logprobs``, ``logit_bias``, tools, ``response_format``) are accepted only at their neutral value
(``check_request`` names the one that is not). Every error is the OpenAI body
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for bad input (:class:`ApiError`).

Differences from OpenAI: ``temperature`` defaults to 0 (greedy, as LLaVA's evaluation; OpenAI's default is 1), and
``usage`` also reports ``image_tokens``, the image placeholder tokens of the prompt (part of ``prompt_tokens``).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP = 4  # stop sequences per request, as OpenAI


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``; the message is one line."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",  # noqa: A002 (OpenAI's field name)
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str  # http(s):// or data:image/...;base64,...
    detail: Literal["auto", "low", "high"] | None = None  # accepted and ignored: the checkpoint's image mode decides


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


UserPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: str | list[UserPart]
    name: str | None = None


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


Message = Annotated[SystemMessage | UserMessage | AssistantMessage, Field(discriminator="role")]


class StreamOptions(_Strict):
    include_usage: bool | None = None  # a last chunk with the usage and no choices
    include_obfuscation: bool | None = None  # accepted; no obfuscation is added


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name; one of the two, or both equal
    temperature: float | None = Field(None, ge=0, le=2)  # default 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None  # sampling only: the same seed and request give the same answer
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored
    # OpenAI parameters accepted only at their neutral value (see ``unsupported_parameter``).
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


NEUTRAL: dict[str, tuple[Any, ...]] = {  # parameter -> the values that ask for nothing this server lacks
    "n": (None, 1),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}),
}


def check_request(body: ChatCompletionRequest) -> None:
    """Checks the schema cannot express; raises a 400 ``ApiError`` naming the parameter."""
    for name, neutral in NEUTRAL.items():
        if getattr(body, name) not in neutral:
            raise ApiError(400, f"{name}={getattr(body, name)!r} is not supported by this server", name, "unsupported")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
    both = body.max_tokens is not None and body.max_completion_tokens is not None
    if both and body.max_tokens != body.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens differ; give one", "max_tokens")
    stops = stop_strings(body)
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise ApiError(400, f"stop takes up to {MAX_STOP} non-empty strings, got {stops!r}", "stop")


def requested_max_tokens(body: ChatCompletionRequest) -> int | None:
    return body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens


def stop_strings(body: ChatCompletionRequest) -> tuple[str, ...]:
    if body.stop is None:
        return ()
    return (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, image_tokens: int) -> dict[str, int]:
    """OpenAI's usage plus ``image_tokens`` (the image placeholders among the prompt tokens)."""
    total = prompt_tokens + completion_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": total,
        "image_tokens": image_tokens,
    }


def completion(
    id_: str, model: str, content: str, finish_reason: str, usage_: dict[str, int], created: int | None = None
) -> dict[str, Any]:
    """A ``chat.completion`` object with one choice."""
    return {
        "id": id_,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_,
    }


def chunk(
    id_: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage_: dict[str, int] | None = None,
    with_usage: bool = False,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``: one choice with ``delta``, or no choice (``delta=None``: the usage chunk)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    out = {
        "id": id_,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
    }
    if with_usage:
        out["usage"] = usage_
    return out


def model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "llava_stf"}


__all__ = [
    "MAX_STOP",
    "ApiError",
    "AssistantMessage",
    "ChatCompletionRequest",
    "ImagePart",
    "Message",
    "SystemMessage",
    "TextPart",
    "UserMessage",
    "check_request",
    "chunk",
    "completion",
    "model_card",
    "new_id",
    "requested_max_tokens",
    "stop_strings",
    "usage",
]
