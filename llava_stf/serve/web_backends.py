"""Where the web demo's answers come from: a ``Backend`` protocol and its two implementations.

``LocalBackend`` runs a checkpoint in this process through the one generation engine (``generation.Generator``) and
the chat CLI's multi-turn session (``chat.ChatSession``: the checkpoint's saved template, the image tag on the first
question, special-token strings removed, the context limit), so the demo answers exactly as the chat CLI does for the
same conversation. ``ApiBackend`` sends the conversation to an OpenAI-compatible server (``python -m
llava_stf.serve.api``, or any other) with the official ``openai`` client, streaming, the image as a ``data:`` URI in
the first user message (the OpenAI chat-completions format, https://platform.openai.com/docs/api-reference/chat).

Both yield ``Reply`` objects: the answer so far while it streams, then one last ``Reply`` with ``Stats`` (image tokens,
new tokens, seconds). An expected failure (a question too long for the context, an unreachable server, an error
status) is a ``BackendError`` with a one-line message the page shows.
"""

from __future__ import annotations

import base64
import io
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from ..data.conversation import GPT, Turn
from ..data.images import ImageLimits
from ..generation import GenerationSettings, Generator
from .chat import ChatError, ChatSession
from .images import decode_image


class BackendError(RuntimeError):
    """A question the backend could not answer; the message is one line for the page."""


@dataclass(frozen=True)
class UploadedImage:
    """An uploaded image that passed the image policy: the decoded RGB image and its file bytes (for the API)."""

    image: Image.Image
    data: bytes
    name: str

    @classmethod
    def from_bytes(cls, data: bytes, name: str, limits: ImageLimits | None = None) -> UploadedImage:
        """Check and decode image file bytes (``data.images`` policy). Raises ``ImageSourceError`` (one line)."""
        return cls(decode_image(data, name, limits), data, name)

    def data_uri(self) -> str:
        """``data:image/<format>;base64,...`` of the original file (its format sniffed from the header)."""
        with Image.open(io.BytesIO(self.data)) as header:
            mime = Image.MIME.get(header.format or "", "image/png")
        return f"data:{mime};base64,{base64.b64encode(self.data).decode('ascii')}"


@dataclass(frozen=True)
class Stats:
    """What one answer cost; ``None`` where the backend does not say."""

    image_tokens: int | str | None  # placeholders the image took in the prompt ("<= N" for an adaptive reducer)
    new_tokens: int | None  # tokens generated, the stop token included
    seconds: float

    def line(self) -> str:
        """``image tokens: 144 · new tokens: 23 · 0.4 s`` (``n/a`` for what is unknown)."""
        image = "none" if self.image_tokens == 0 else self.image_tokens
        parts = [("image tokens", image), ("new tokens", self.new_tokens)]
        return " · ".join(f"{k}: {'n/a' if v is None else v}" for k, v in parts) + f" · {self.seconds:.1f} s"


@dataclass(frozen=True)
class Reply:
    text: str  # the answer so far (the whole answer when ``stats`` is set)
    stats: Stats | None = None  # set on the last reply only


Exchange = tuple[str, str]  # (question, answer) of a finished turn


class Backend(Protocol):
    name: str  # shown in the page's header: the checkpoint folder or the server's model
    details: str  # shown after it: the projector and template, or the server's URL

    def stream(
        self, history: Sequence[Exchange], question: str, image: UploadedImage | None, settings: GenerationSettings
    ) -> Iterator[Reply]:
        """Answer ``question`` after ``history`` about ``image``; closing the iterator stops the generation."""
        ...


class _Cancelled(Exception):
    """Raised from the stream callback to stop ``model.generate`` when the page stops listening."""


class LocalBackend:
    """A checkpoint in this process; one answer at a time (the model is shared by every browser tab)."""

    def __init__(self, generator: Generator, name: str, details: str = ""):
        self.generator, self.name, self.details = generator, name, details
        self._lock = threading.Lock()

    def image_tokens(self, image: UploadedImage | None) -> int | str:
        """Placeholders the image takes: the checkpoint's count (AnyRes: by the image's size; an upper bound for an
        adaptive reducer)."""
        count = self.generator.processor.image_token_counts([image.image])[0] if image is not None else 0
        adaptive = getattr(self.generator.model.config, "adaptive_image_tokens", False)
        return f"<= {count}" if adaptive and count else count

    def session(
        self, history: Sequence[Exchange], image: UploadedImage | None, settings: GenerationSettings
    ) -> ChatSession:
        """A ``ChatSession`` holding ``history`` as if it had been asked there (image tag on the first question)."""
        try:
            session = ChatSession(self.generator, None if image is None else image.image, settings)
        except ChatError as err:
            raise BackendError(str(err)) from None
        for question, answer in history:  # cleaned again: what was asked is what the history holds
            session.turns = [*session.request(session.clean(question)[0]).turns, Turn(GPT, answer)]
        return session

    def stream(
        self, history: Sequence[Exchange], question: str, image: UploadedImage | None, settings: GenerationSettings
    ) -> Iterator[Reply]:
        session = self.session(history, image, settings)
        question, _ = session.clean(question)
        if not question:
            raise BackendError("the question is empty (special-token strings such as <image> are removed)")
        pieces: queue.Queue = queue.Queue()
        stop = threading.Event()
        steps = [0]

        def on_text(text: str) -> None:
            if stop.is_set():
                raise _Cancelled
            pieces.put(text)

        def count_step(*_) -> None:  # one forward call of the model per generated token
            steps[0] += 1

        def work() -> None:
            try:
                with self._lock:
                    hook = self.generator.model.register_forward_hook(count_step)
                    try:
                        pieces.put(("done", session.ask(question, stream=on_text)))
                    finally:
                        hook.remove()
            except _Cancelled:
                pieces.put(("done", None))
            except ChatError as err:
                pieces.put(("error", BackendError(str(err))))
            except BaseException as err:  # handed to the page's thread, which raises it
                pieces.put(("error", err))

        start = time.perf_counter()
        worker = threading.Thread(target=work, name="web-generate", daemon=True)
        worker.start()
        text = ""
        try:
            while True:
                piece = pieces.get()
                if isinstance(piece, str):
                    text += piece
                    if text.strip():
                        yield Reply(text.lstrip())
                    continue
                kind, value = piece
                if kind == "error":
                    raise value
                stats = Stats(self.image_tokens(image), steps[0], time.perf_counter() - start)
                yield Reply(value, stats)
                return
        finally:
            stop.set()  # the page closed the stream early: the next token stops generate


class ApiBackend:
    """An OpenAI-compatible server, through the official ``openai`` client (streaming)."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0):
        import openai  # the [serve] extra; imported here so the local demo does not need it

        self._openai = openai
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=0)
        self.base_url = base_url
        self.model = model or self._first_model()
        self.name, self.details = self.model, f"at {base_url}"

    def _first_model(self) -> str:
        try:
            models = [m.id for m in self.client.models.list()]
        except self._openai.OpenAIError as err:
            raise BackendError(f"cannot list the models of {self.base_url}: {_one_line(err)}") from None
        if not models:
            raise BackendError(f"{self.base_url} serves no model (GET /models is empty); pass --model")
        return models[0]

    @staticmethod
    def messages(history: Sequence[Exchange], question: str, image: UploadedImage | None) -> list[dict]:
        """The OpenAI ``messages``: alternating user / assistant, the image part in the first user message."""
        messages: list[dict] = []
        for i, (asked, answer) in enumerate([*history, (question, None)]):
            content: list[dict] = [{"type": "text", "text": asked}]
            if i == 0 and image is not None:
                content.insert(0, {"type": "image_url", "image_url": {"url": image.data_uri()}})
            messages.append({"role": "user", "content": content})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        return messages

    def stream(
        self, history: Sequence[Exchange], question: str, image: UploadedImage | None, settings: GenerationSettings
    ) -> Iterator[Reply]:
        start, text, usage = time.perf_counter(), "", None
        try:
            sampling = {"top_p": settings.top_p} if settings.sampling and settings.top_p is not None else {}
            chunks = self.client.chat.completions.create(
                model=self.model,
                messages=self.messages(history, question, image),
                stream=True,
                stream_options={"include_usage": True},  # the last chunk carries the usage
                max_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                **sampling,
            )
            with chunks:  # closing it (the page stopped listening) drops the connection: the server cancels
                for chunk in chunks:
                    usage = chunk.usage or usage
                    added = "".join(choice.delta.content or "" for choice in chunk.choices)
                    text += added
                    if added and text.strip():
                        yield Reply(text.lstrip())
        except self._openai.OpenAIError as err:
            raise BackendError(f"{self.base_url}: {_one_line(err)}") from None
        yield Reply(text.strip(), Stats(_image_tokens(usage), getattr(usage, "completion_tokens", None), _since(start)))


def _image_tokens(usage) -> int | None:
    """The image tokens a server reports: ``usage.prompt_tokens_details.image_tokens`` or ``usage.image_tokens``."""
    if usage is None:
        return None
    details = getattr(usage, "prompt_tokens_details", None)
    for source in (details, usage):
        value = getattr(source, "image_tokens", None) or (getattr(source, "model_extra", None) or {}).get(
            "image_tokens"
        )
        if value is not None:
            return int(value)
    return None


def _since(start: float) -> float:
    return time.perf_counter() - start


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


__all__ = ["ApiBackend", "Backend", "BackendError", "Exchange", "LocalBackend", "Reply", "Stats", "UploadedImage"]
