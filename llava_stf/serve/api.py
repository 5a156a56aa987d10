"""``python -m llava_stf.serve.api``: an OpenAI-compatible chat-completions server for a llava_stf checkpoint.

Usage::

    python -m llava_stf.serve.api --model-path CKPT [--host 127.0.0.1] [--port 8000] [--api-key KEY]

then any OpenAI client: ``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY or "none")``. Routes:
``POST /v1/chat/completions`` (text and ``image_url`` content parts, multi-turn, ``max_tokens``, ``temperature``,
``top_p``, ``seed``, ``stop``, ``stream`` as server-sent ``chat.completion.chunk`` events ending in ``data: [DONE]``;
``usage`` adds ``image_tokens``), ``GET /v1/models``, ``GET /health`` (no key needed; the batcher's counters).

Answers come from the one ``Generator`` with the checkpoint's saved template and image mode, so a question gets the
answer ``python -m llava_stf.eval`` and the chat CLI give it (greedy by default). Concurrent requests are batched
(``serve.batcher``: ``--max-batch``, ``--batch-window-ms``); at most ``--max-queue`` wait, beyond that a 429 with
``Retry-After``; a client that disconnects cancels its work. Bad input gets an OpenAI-style JSON error with a 4xx
status (``serve.openai_schema``, ``serve.openai_messages``). Binds to 127.0.0.1 unless ``--host`` says otherwise;
``--api-key`` makes ``/v1`` routes check ``Authorization: Bearer``. Startup errors (a folder that is not a
checkpoint, a port in use) are one ``error:`` line (``llava_stf.errors.run_main``).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..data.images import ImageLimits
from ..errors import DEBUG_ENV, UserError, run_main
from ..eval.identity import identity_of
from ..generation import Generator
from ..reducer_choice import choice_from_args
from .api_http import BodyLimit, KeyCheck, add_error_handlers, check_model, put_event, sse_events, wait_result
from .batcher import Batcher, QueueFull
from .cli import add_model_flags, check_model_path, image_limits, load_generator, resolve_device
from .engine import Job, ServeEngine
from .images import DEFAULT_TIMEOUT
from .openai_messages import load_image, to_conversation
from .openai_schema import (
    ApiError,
    ChatCompletionRequest,
    check_request,
    completion,
    model_card,
    new_id,
    requested_max_tokens,
    stop_strings,
    usage,
)


@dataclass(frozen=True)
class ApiSettings:
    """How the server behaves (the CLI flags)."""

    model_id: str = "llava_stf"  # what /v1/models lists and requests must name
    api_key: str | None = None  # None: no Authorization check
    max_batch: int = 16
    max_queue: int = 64
    batch_window: float = 0.01  # seconds
    max_tokens: int = 1024  # the largest max_tokens a request may ask for (used when given a Generator)
    image_timeout: float = DEFAULT_TIMEOUT  # seconds for an image URL download
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    image_urls: bool = True  # fetch http(s) image URLs (False: data: URIs only, no outgoing requests)
    retry_after: int = 1  # seconds, sent with a 429
    max_body_bytes: int | None = None  # larger request bodies get a 413; None: one largest image in base64 + 1 MiB

    def body_limit(self) -> int:
        """The request-body limit in bytes (the default fits one ``image_limits.max_bytes`` image as base64)."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return -(-self.image_limits.max_bytes * 4 // 3) + 2**20


def create_app(generator_or_engine: Generator | ServeEngine, settings: ApiSettings | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the batcher (``app.state.batcher``)."""
    settings = settings or ApiSettings()
    engine = generator_or_engine
    if isinstance(engine, Generator):
        engine = ServeEngine(engine, settings.max_tokens)
    batcher = Batcher(engine, settings.max_batch, settings.max_queue, settings.batch_window)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)

    app = FastAPI(title="llava_stf", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.engine, app.state.settings = batcher, engine, settings
    add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.body_limit())
    if settings.api_key is not None:
        app.add_middleware(KeyCheck, api_key=settings.api_key)

    def busy(why: str) -> ApiError:
        message, headers = f"the server is busy: {why}; retry later", {"Retry-After": str(settings.retry_after)}
        return ApiError(429, message, None, "rate_limit_exceeded", "requests", headers)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_id, **batcher.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(settings.model_id, created)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        check_model(model, settings.model_id, "model")
        return model_card(settings.model_id, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model, settings.model_id)
        if batcher.waiting >= batcher.max_queue:  # refused before its image is fetched and decoded
            raise busy(f"{batcher.waiting} requests are waiting (--max-queue {batcher.max_queue})")
        job = await run_in_threadpool(prepare, engine, settings, body)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job.sink = lambda kind, payload: put_event(loop, events, (kind, payload))
        try:
            batcher.submit(job)
        except QueueFull as err:
            raise busy(str(err)) from None
        id_, created_at = new_id(), int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = sse_events(job, events, id_, created_at, settings.model_id, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        result = await wait_result(job, events, request)
        if result is None:  # the client has gone
            return Response(status_code=499)
        counts = usage(result.prompt_tokens, result.completion_tokens, result.image_tokens)
        return JSONResponse(
            completion(id_, settings.model_id, result.content, result.finish_reason, counts, created_at)
        )

    return app


def prepare(engine: ServeEngine, settings: ApiSettings, body: ChatCompletionRequest) -> Job:
    """The job for a request: messages mapped, image loaded, prompt counted (runs in a worker thread).

    Raises:
        ApiError: 400 for anything the request asks that cannot be answered.
    """
    check_request(body)
    conversation = to_conversation(body.messages, engine.special_tokens)
    image = None
    if conversation.image_url is not None:
        url, param = conversation.image_url, conversation.image_param or "messages"
        image = load_image(url, param, settings.image_timeout, settings.image_limits, settings.image_urls)
    request, system = engine.request(conversation, image)
    text_tokens, image_tokens = engine.prompt_tokens(request, system)
    param = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
    max_tokens = engine.check_length(text_tokens + image_tokens, requested_max_tokens(body), param)
    temperature = body.temperature or 0.0
    sampling = temperature > 0
    return Job(
        request,
        max_tokens,
        text_tokens,
        system,
        temperature,
        body.top_p if sampling else None,
        body.seed if sampling else None,  # greedy answers need no seed
        stop_strings(body),
        bool(body.stream),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llava_stf.serve.api", description=__doc__.splitlines()[0].split(": ", 1)[1]
    )
    parser.add_argument("--model-path", type=Path, required=True, help="checkpoint folder (model + LlavaStfProcessor)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    parser.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1 routes")
    parser.add_argument("--model-name", help="the served model id (default: folder name + digest, as eval)")
    parser.add_argument("--max-batch", type=int, default=16, help="most requests in one batch")
    parser.add_argument("--max-queue", type=int, default=64, help="most requests waiting; beyond: 429 + Retry-After")
    parser.add_argument("--batch-window-ms", type=float, default=10.0, help="wait for more requests to batch with")
    parser.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask (default)")
    add_model_flags(parser)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to download an image URL")
    limits = ImageLimits()
    parser.add_argument("--max-image-bytes", type=int, default=limits.max_bytes, help="largest image (64 MiB)")
    parser.add_argument("--max-image-pixels", type=int, default=limits.max_pixels, help="largest width * height")
    parser.add_argument("--max-aspect-ratio", type=float, default=limits.max_aspect_ratio, help="long / short side")
    parser.add_argument("--no-image-urls", action="store_true", help="refuse http(s) image URLs (data: URIs "
                        "only): the server makes no request to other hosts")  # fmt: skip
    parser.add_argument("--max-body-bytes", type=int, help="largest request body (default: one largest image as "
                        "base64 + 1 MiB); larger: 413")  # fmt: skip
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.add_argument("--debug", action="store_true", help=f"the traceback of a startup error (or {DEBUG_ENV}=1)")
    return parser


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (bound here, so a port in use is a one-line error).

    Its protocol is stated (``IPPROTO_TCP``, not 0): asyncio sets ``TCP_NODELAY`` only on connections of such a
    socket, and without it every response on a kept-alive connection waits ~40 ms for a delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def run(args: argparse.Namespace) -> int:
    import uvicorn

    for flag, value in [
        ("--max-batch", args.max_batch),
        ("--max-queue", args.max_queue),
        ("--max-tokens", args.max_tokens),
        ("--max-body-bytes", 1 if args.max_body_bytes is None else args.max_body_bytes),
    ]:
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if not args.batch_window_ms >= 0:
        raise UserError(f"--batch-window-ms must be >= 0, got {args.batch_window_ms:g}")
    load_in_bits = 8 if args.load_8bit else 4 if args.load_4bit else None
    device = resolve_device(args.device, load_in_bits)
    limits = image_limits(args)
    check_model_path(args.model_path)
    reducer = choice_from_args(args)
    identity = identity_of(args.model_path, args.model_name, reducer)
    if args.threads:
        torch.set_num_threads(args.threads)
    sock = listen(args.host, args.port)
    with sock:
        generator = load_generator(args, device, load_in_bits, reducer)
        settings = ApiSettings(
            model_id=identity.model_id,
            api_key=args.api_key,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            batch_window=args.batch_window_ms / 1000,
            max_tokens=args.max_tokens,
            image_timeout=args.timeout,
            image_limits=limits,
            max_body_bytes=args.max_body_bytes,
            image_urls=not args.no_image_urls,
        )
        app = create_app(generator, settings)
        host, port = sock.getsockname()[:2]
        if args.api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
            print(f"note: listening on {host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
        host = f"[{host}]" if ":" in host else host
        print(f"serving {identity.model_id} at http://{host}:{port}/v1 (max batch {args.max_batch})", file=sys.stderr)
        config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level in ("info", "debug"))
        uvicorn.Server(config).run(sockets=[sock])
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the server; return the exit status (0 stopped, 1 startup error, 2 bad arguments)."""
    args = build_parser().parse_args(argv)
    return run_main(lambda: run(args), args.debug)


__all__ = ["ApiSettings", "build_parser", "create_app", "main", "prepare"]

if __name__ == "__main__":
    sys.exit(main())
