"""The model side of the API: requests from conversations, prompt token counts, and one batch run with per-row limits.

``ServeEngine`` wraps the one ``Generator`` (the checkpoint's saved template, image mode and EOS; prompts encoded as
for ``python -m llava_stf.eval``). ``run(jobs)`` answers a batch with a single ``Generator.generate`` call. The
``Generator`` hands ``model.generate`` the batch's rows (``_Rows``) as a stopping criterion (transformers'
``StoppingCriteria``) and as a second streamer (``_Tap``), so every row ends on its own: at EOS,
at its own ``max_tokens``, at its first stop string, or as soon as its client has gone (``Job.cancel``). The batch
decodes up to the largest ``max_tokens`` among its rows; rows are independent under greedy decoding (left padding,
attention mask), so a row stopped at k tokens is what a batch of one would have given with ``max_new_tokens=k``.
Each row's result is delivered the moment it ends, not when the batch does.

A row's content is decoded from its own tokens exactly as the ``Generator`` decodes an answer (up to EOS, without
special tokens, stripped), then cut before the first stop string; streamed deltas come from the generator's stream
callback through a ``TextStream``, which holds back what a stop string or the strip could still take back, so they
join to that content. ``usage`` counts come from the tensors that ran: the image placeholders in the encoded prompt
(an adaptive reducer's own count per image) and the tokens each row generated, EOS included.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..data.conversation import HUMAN, IMAGE_TOKEN, PlainTemplate, SeparatorTemplate, Turn
from ..generation import GenerationSettings, Generator, Request
from .chat import context_length
from .openai_messages import Conversation
from .openai_schema import ApiError
from .text_stream import TextStream

Sink = Callable[[str, Any], None]  # ("delta", text) | ("done", Result) | ("error", ApiError); called from the worker


@dataclass(frozen=True)
class Result:
    content: str
    finish_reason: str  # "stop": EOS or a stop string; "length": max_tokens reached
    prompt_tokens: int  # image placeholders included
    completion_tokens: int  # generated tokens, EOS included
    image_tokens: int


@dataclass(eq=False)
class Job:
    """One request waiting for, or in, a batch."""

    request: Request
    max_tokens: int
    text_tokens: int  # prompt tokens other than image placeholders
    system: str | None = None  # replaces the template's system prompt
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    stops: tuple[str, ...] = ()
    stream: bool = False  # deliver ("delta", text) events as the answer grows
    sink: Sink = field(default=lambda kind, payload: None, repr=False)
    cancelled: bool = False  # its client has gone: dropped before it runs, stopped while it runs
    finished: bool = False  # its result was delivered
    generated: int = 0  # tokens generated so far

    def cancel(self) -> None:
        """The client has gone (a no-op once the result is delivered)."""
        if not self.finished:
            self.cancelled = True

    @property
    def group(self) -> tuple:
        """Jobs with equal groups share a batch: greedy ones all together, seeded sampling one at a time."""
        if self.temperature == 0:
            return ("greedy", self.system)
        if self.seed is not None:
            return ("seeded", id(self))
        return ("sampled", self.system, self.temperature, self.top_p)


class _Rows(StoppingCriteria):
    """The rows of one batch: their text (the ``Generator``'s stream callback), their tokens (``_Tap``) and when
    each ends (this stopping criterion).

    A row is marked done at the step its EOS, its ``max_tokens``, its stop string or its cancellation is seen, and
    closed (result delivered) once the streamer has been handed that step's token: transformers calls the stopping
    criteria before the streamer in each step (or one step ahead of it), so tokens are counted, not assumed.
    """

    def __init__(self, jobs: Sequence[Job], generator: Generator, image_token_id: int):
        self.jobs, self.generator, self.image_token_id = list(jobs), generator, image_token_id
        self.texts = [TextStream(job.stops) for job in jobs]
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.done_at: list[int | None] = [None] * len(jobs)  # the step at which the row ended
        self.closed = [False] * len(jobs)
        self.steps = 0
        self.image_tokens = [0] * len(jobs)

    def on_text(self, row: int, piece: str) -> None:
        """The ``Generator``'s stream callback."""
        job = self.jobs[row]
        shown = "" if self.closed[row] else self.texts[row].feed(piece)
        if shown and job.stream and not job.cancelled:
            job.sink("delta", shown)

    def on_prompt(self, input_ids: torch.Tensor) -> None:
        """The encoded prompts ``[B, T]``: count each row's image placeholders (an adaptive reducer's own count)."""
        self.image_tokens = (input_ids == self.image_token_id).sum(1).tolist()

    def on_tokens(self, tokens: torch.Tensor) -> None:
        """One step's tokens ``[B]`` (after the stream callback saw them)."""
        for row, token in enumerate(tokens.reshape(-1).tolist()):
            self.tokens[row].append(token)
        self._close_ready()

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs) -> torch.BoolTensor:
        """Mark rows done; ``input_ids`` ``[B, T + n]``: the prompts and the n tokens generated so far."""
        self.steps += 1
        last = input_ids[:, -1].tolist()
        for row, job in enumerate(self.jobs):
            if self.done_at[row] is not None:
                continue
            job.generated += 1
            ended = last[row] in self.generator.eos_token_ids or self._stop_seen(input_ids, row)
            if ended or job.cancelled or job.generated >= job.max_tokens:
                self.done_at[row] = self.steps
        self._close_ready()
        return torch.tensor([d is not None for d in self.done_at], dtype=torch.bool, device=input_ids.device)

    def _stop_seen(self, input_ids: torch.LongTensor, row: int) -> bool:
        """Whether the row's text so far holds a stop string, decoded from ``input_ids`` ``[B, T + n]`` itself: the
        text streamer holds a word back until the next token, so waiting for it would generate one token too many."""
        stops = self.jobs[row].stops
        if not stops:
            return False
        text = self.generator.tokenizer.decode(input_ids[row, -self.steps :].tolist(), skip_special_tokens=True)
        return any(stop in text.lstrip() for stop in stops)

    def _close_ready(self) -> None:
        for row, step in enumerate(self.done_at):
            if step is not None and not self.closed[row] and len(self.tokens[row]) >= step:
                self.close(row)

    def close(self, row: int) -> None:
        """Deliver the row's result (nothing for a cancelled row)."""
        self.closed[row] = True
        job = self.jobs[row]
        if job.cancelled:
            return
        job.finished = True
        tokens = self.tokens[row][: job.generated]
        eos = next((i for i, t in enumerate(tokens) if t in self.generator.eos_token_ids), None)
        answer = self.generator.tokenizer.decode(tokens[:eos], skip_special_tokens=True)  # as Generator's answers
        text = self.texts[row]
        rest = text.close(answer)
        if rest and job.stream:
            job.sink("delta", rest)
        reason = "stop" if eos is not None or text.stopped else "length"
        images = self.image_tokens[row]
        job.sink("done", Result(text.content, reason, job.text_tokens + images, job.generated, images))

    def close_all(self) -> None:
        """After ``generate`` returned: rows still open ended with the batch (its ``max_new_tokens``)."""
        for row in range(len(self.jobs)):
            if not self.closed[row]:
                self.close(row)


class _Tap(BaseStreamer):
    """The rows' view of ``model.generate``'s streamer calls (after the ``Generator``'s own stream callback)."""

    def __init__(self, rows: _Rows):
        self.rows, self.prompt_seen = rows, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.rows.on_tokens(value)
        else:  # the first call carries the prompt ids [B, T]
            self.prompt_seen = True
            self.rows.on_prompt(value)

    def end(self) -> None:
        pass


class ServeEngine:
    """The API's access to a checkpoint: builds requests, counts prompts, answers batches of jobs.

    Args:
        generator: The loaded checkpoint.
        max_tokens: The most tokens one answer may ask for (also the default, within the context).
    """

    def __init__(self, generator: Generator, max_tokens: int = 1024):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.generator = generator
        self.processor, self.template = generator.processor, generator.template
        self.context_length = context_length(generator.model)
        self.special_tokens = sorted({*generator.tokenizer.all_special_tokens, IMAGE_TOKEN}, key=lambda t: (-len(t), t))
        self._variants: dict[str, Generator] = {}

    def request(self, conversation: Conversation, image: Image.Image | None) -> tuple[Request, str | None]:
        """The ``Request`` and system prompt for ``conversation`` (a ``plain`` stage-1 checkpoint captions the image:
        only an image is needed, and the words and history are ignored, as in the chat CLI)."""
        system = conversation.system
        if isinstance(self.template, SeparatorTemplate) and system == self.template.system:
            system = None
        if isinstance(self.template, PlainTemplate):
            if image is None:
                raise ApiError(
                    400, "this stage-1 checkpoint ('plain' template) only captions an image: send one", "messages"
                )
            if system is not None:
                raise ApiError(400, "this stage-1 checkpoint ('plain' template) takes no system prompt", "messages")
            return Request((Turn(HUMAN, IMAGE_TOKEN),), image), None
        if system is not None and not isinstance(self.template, SeparatorTemplate):
            raise ApiError(400, f"the {self.template.name!r} template takes no system prompt", "messages")
        return Request(conversation.turns, image), system

    def prompt_tokens(self, request: Request, system: str | None = None) -> tuple[int, int]:
        """``(text tokens, image tokens)`` of the prompt; the image count is exact (AnyRes: by the image's size), or
        its most for an adaptive reducer (the actual count is known once the image is encoded: ``Result.image_tokens``).
        """
        images = self.processor.image_token_counts([request.image])[0] if request.image is not None else 0
        ids = self.processor.encode_prompt(
            self.variant(system).prompt(request), image_tokens=[images] if images else []
        )
        return len(ids) - images, images

    def check_length(self, prompt: int, max_tokens: int | None, param: str = "max_tokens") -> int:
        """The answer's token limit: ``max_tokens`` checked against the cap and the context, or the default.

        Raises:
            ApiError: 400 for max_tokens < 1 or over the cap, or a prompt (plus max_tokens) over the context.
        """
        if max_tokens is not None and not 1 <= max_tokens <= self.max_tokens:
            raise ApiError(400, f"{param} must be in [1, {self.max_tokens}], got {max_tokens}", param)
        context = self.context_length
        if context is not None and prompt >= context:
            raise ApiError(
                400,
                f"the prompt is {prompt} tokens, over the model's context of {context}",
                "messages",
                "context_length_exceeded",
            )
        if context is not None and max_tokens is not None and prompt + max_tokens > context:
            raise ApiError(
                400,
                f"this model's maximum context length is {context} tokens; the request needs {prompt + max_tokens} "
                f"({prompt} in the messages, {max_tokens} in the completion): shorten the messages or {param}",
                param,
                "context_length_exceeded",
            )
        if max_tokens is not None:
            return max_tokens
        return self.max_tokens if context is None else min(self.max_tokens, context - prompt)

    def variant(self, system: str | None) -> Generator:
        """The generator whose template has ``system`` as its system prompt (``None``: the checkpoint's)."""
        if system is None:
            return self.generator
        variant = self._variants.get(system)
        if variant is None:
            if len(self._variants) >= 64:  # a bounded cache of system prompts
                self._variants.clear()
            variant = copy.copy(self.generator)
            variant.template = dataclasses.replace(self.template, system=system)
            self._variants[system] = variant
        return variant

    def run(self, jobs: Sequence[Job]) -> None:
        """Answer ``jobs`` (one group: the same system prompt and sampling settings) in one ``generate`` call;
        each job's sink gets its deltas and its result. An exception leaves the unfinished jobs to the caller."""
        first = jobs[0]
        settings = GenerationSettings(
            max_new_tokens=max(job.max_tokens for job in jobs), temperature=first.temperature, top_p=first.top_p
        )
        rows = _Rows(jobs, self.generator, self.processor.image_token_id)
        if settings.sampling and first.seed is not None:
            torch.manual_seed(first.seed)
        self.variant(first.system).generate(
            [job.request for job in jobs],
            settings,
            stream=rows.on_text,
            stopping_criteria=StoppingCriteriaList([rows]),
            token_streamer=_Tap(rows),
        )
        rows.close_all()


__all__ = ["Job", "Result", "ServeEngine"]
