"""The HTTP side of the API: events from the batcher's thread, waiting for a result, server-sent events, the key
check and the OpenAI-style error handlers.

Events of a job (``("delta", text)``, ``("done", Result)``, ``("error", ApiError)``) arrive from the batcher's worker
thread and are put on the request's ``asyncio.Queue`` with ``call_soon_threadsafe``. A non-streaming request polls
``Request.is_disconnected`` while it waits (every ``POLL`` seconds) and cancels its job when the client has gone; a
streaming one is closed by Starlette when the client disconnects, and its ``finally`` cancels the job. A stream is
``data: {chat.completion.chunk}`` events (the role first, then content deltas, then ``finish_reason``, then the usage
when ``stream_options.include_usage``), and ``data: [DONE]``; deltas that queued up while the event loop was busy go
out as one chunk. An error after the stream began is a ``data: {"error": ...}`` event, as OpenAI sends.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .engine import Job, Result
from .openai_schema import ApiError, chunk, usage

POLL = 0.25  # seconds between checks that a waiting non-streaming client is still connected


def put_event(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, event: tuple[str, Any]) -> None:
    try:
        loop.call_soon_threadsafe(events.put_nowait, event)
    except RuntimeError:  # the event loop has closed: the server is gone
        pass


async def _next_final(events: asyncio.Queue) -> Result:
    while True:
        kind, payload = await events.get()
        if kind == "done":
            return payload
        if kind == "error":
            raise payload


async def wait_result(job: Job, events: asyncio.Queue, request: Request) -> Result | None:
    """The job's result; None (and the job cancelled) if the client disconnects first."""
    waiter = asyncio.ensure_future(_next_final(events))
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=POLL)
            if done:
                return waiter.result()
            if await request.is_disconnected():
                job.cancel()
                return None
    finally:
        waiter.cancel()


async def sse_events(
    job: Job, events: asyncio.Queue, id_: str, created: int, model_id: str, include_usage: bool
) -> AsyncIterator[str]:
    """The server-sent events of a streamed answer; closing it early (the client left) cancels the job."""

    def event(delta: dict | None, finish: str | None = None, counts: dict | None = None) -> str:
        body = chunk(id_, model_id, created, delta, finish, counts, include_usage)
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield event({"role": "assistant", "content": ""})
        pending: tuple[str, Any] | None = None
        while True:
            kind, payload = pending or await events.get()
            pending = None
            if kind == "delta":
                while not events.empty():  # deltas that arrived meanwhile go out as one chunk (fewer under load)
                    pending = events.get_nowait()
                    if pending[0] != "delta":
                        break
                    payload, pending = payload + pending[1], None
                yield event({"content": payload})
                continue
            if kind == "done":
                yield event({}, payload.finish_reason)
                if include_usage:
                    yield event(
                        None, None, usage(payload.prompt_tokens, payload.completion_tokens, payload.image_tokens)
                    )
            else:
                yield f"data: {json.dumps(payload.body())}\n\n"
            break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a no-op once answered


def check_model(name: str, model_id: str, param: str = "model") -> None:
    if name != model_id:
        raise ApiError(
            404, f"The model `{name}` does not exist; this server serves `{model_id}`", param, "model_not_found"
        )


class KeyCheck:
    """ASGI middleware: ``/v1`` routes need ``Authorization: Bearer <api_key>`` (401 otherwise; ``/health`` is open)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, given = header.partition(" ")
            error = None
            if scheme.lower() != "bearer" or not given.strip():
                error = ApiError(401, "no API key given: send Authorization: Bearer <key>", code="invalid_api_key")
            elif not hmac.compare_digest(given.strip().encode("latin-1"), self.api_key):
                error = ApiError(401, "incorrect API key provided", code="invalid_api_key")
            if error is not None:
                await JSONResponse(error.body(), error.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets a 413 before anything parses it.

    A declared ``Content-Length`` is checked first; a chunked upload is read up to the limit (the app would read it
    all anyway to parse the JSON) and replayed to the app as one message, so later ``receive`` calls still report a
    client disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self.refuse(scope, receive, send)
            return
        chunks, size, message = [], 0, {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                replayed = iter([message])
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self.refuse(scope, receive, send)
                return
        else:
            replayed = iter([{"type": "http.request", "body": b"".join(chunks), "more_body": False}])

        async def replay() -> Message:
            return next(replayed, None) or await receive()

        await self.app(scope, replay, send)

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = ApiError(413, f"the request body is larger than {self.max_bytes} bytes", code="request_too_large")
        await JSONResponse(error.body(), error.status)(scope, receive, send)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        error = validation_error(err.errors())
        return JSONResponse(error.body(), error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(ApiError(err.status_code, str(err.detail), code=code).body(), err.status_code)

    @app.exception_handler(Exception)
    async def bug(_: Request, err: Exception) -> JSONResponse:  # logged with its traceback by Starlette
        error = ApiError(500, f"internal error: {type(err).__name__}", type="server_error")
        return JSONResponse(error.body(), 500)


_UNION_BRANCHES = {"str", "int", "float", "bool", "dict", "list", "none"}  # pydantic names union members in locations
_TAGS = {"system", "developer", "user", "assistant", "text", "image_url"}  # discriminated union tags, after an index


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """One 400 for pydantic's errors about the body: the deepest (the most specific), named as OpenAI names
    parameters (``messages[0].content``)."""
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    loc = [p for p in first.get("loc", ()) if p != "body" and not (isinstance(p, str) and _is_branch(p))]
    loc = [p for i, p in enumerate(loc) if not (p in _TAGS and i and isinstance(loc[i - 1], int))]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    if first.get("type") == "extra_forbidden" and len(loc) == 1:
        return ApiError(400, f"Unrecognized request argument supplied: {loc[0]}", str(loc[0]))
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    return ApiError(400, f"{param or 'the request body'}: {first['msg']}", param)


def _is_branch(part: str) -> bool:
    return "[" in part or part in _UNION_BRANCHES


__all__ = [
    "POLL",
    "add_error_handlers",
    "check_model",
    "KeyCheck",
    "put_event",
    "sse_events",
    "validation_error",
    "wait_result",
]
