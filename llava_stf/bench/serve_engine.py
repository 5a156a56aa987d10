"""The load test's model side alone: the API's ``ServeEngine`` answering batches of 1, 4, 16 jobs in this process.

Each question is turned into a job exactly as the server does it (``serve.api.prepare`` on the chat request the
clients send) and answered by ``ServeEngine.run``, the server's own batch call: the same ``n`` questions at every
batch size (``n`` = the largest size, in chunks of the size), timed after one warm-up pass, median of ``repeats``
passes. The milliseconds per request are the generation cost without HTTP, JSON, server-sent events or client CPU.
Where the clients share the server's CPUs (a load test on one laptop) this is the most batching can give: the HTTP
levels cannot scale better than the engine does. Greedy answers are recorded per question and batch size.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .serve_load import Question


@dataclass
class EngineLevel:
    """One batch size: ``n`` questions in chunks of ``batch``."""

    batch: int
    ms_per_request: float  # median over the timed passes
    answers: list[str] = field(default_factory=list)  # per question, in order


def measure_engine(
    path: Path, questions: Sequence[Question], sizes: Sequence[int], repeats: int, threads: int, max_tokens: int
) -> list[EngineLevel]:
    """``ServeEngine.run`` on the first ``max(sizes)`` questions (cycled) in batches of each size, with ``threads``
    torch threads (restored after)."""
    from ..generation import Generator
    from ..serve.api import ApiSettings, prepare
    from ..serve.engine import ServeEngine
    from ..serve.openai_schema import ChatCompletionRequest

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        engine = ServeEngine(Generator.from_pretrained(path, "cpu"))
        settings = ApiSettings()
        n = max(sizes)
        bodies = [
            ChatCompletionRequest(
                model="bench", messages=questions[i % len(questions)].messages(), max_tokens=max_tokens, temperature=0
            )
            for i in range(n)
        ]

        def one_pass(size: int) -> tuple[float, list[str]]:
            answers: list[str] = [""] * n
            jobs = [prepare(engine, settings, body) for body in bodies]
            for i, job in enumerate(jobs):
                job.sink = lambda kind, payload, i=i: (
                    answers.__setitem__(i, payload.content) if kind == "done" else None
                )
            start = time.perf_counter()
            for first in range(0, n, size):
                engine.run(jobs[first : first + size])
            return time.perf_counter() - start, answers

        levels = []
        for size in sizes:
            _, answers = one_pass(size)  # warm-up
            seconds = [one_pass(size)[0] for _ in range(repeats)]
            levels.append(EngineLevel(size, 1000 * statistics.median(seconds) / n, answers))
        return levels
    finally:
        torch.set_num_threads(before)


__all__ = ["EngineLevel", "measure_engine"]
