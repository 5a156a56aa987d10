"""The load test's moving parts: the API server in a subprocess, the questions, and N concurrent OpenAI clients.

``ServerProcess`` starts ``python -m llava_stf.serve.api`` on 127.0.0.1 with ``--port 0`` and reads the port it
printed; ``run_level`` sends ``requests`` streamed chat completions from ``concurrency`` concurrent clients (asyncio
tasks sharing one official ``openai.AsyncOpenAI`` client, no retries, so a 429 or a timeout counts as an error) and
records per request its latency, its time to the first content delta, its answer and how many answers
(``finish_reason`` chunks) it got. The server's batch counters (``/health``) and the CPU time of the server and of
the clients are recorded per level.
Request ``i`` asks question ``i mod Q``, at every level, so greedy answers can be compared across levels.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

READY = re.compile(r"serving (?P<model>\S+) at (?P<url>http://\S+/v1)")


@dataclass(frozen=True)
class Question:
    text: str
    image_uri: str | None  # data:image/...;base64,...

    def messages(self) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = [{"type": "text", "text": self.text}]
        if self.image_uri is not None:
            content.insert(0, {"type": "image_url", "image_url": {"url": self.image_uri}})
        return [{"role": "user", "content": content}]


def demo_questions(data_root: Path, limit: int) -> list[Question]:
    """The first ``limit`` questions of the demo world (``<root>/eval/questions.jsonl``, images under ``<root>``)."""
    path = data_root / "eval" / "questions.jsonl"
    if not path.is_file():
        raise UserError(f"no questions file {path} (--data-root is the demo world: playground/demo/synthetic)")
    questions, uris = [], {}
    for line in path.read_text().splitlines()[:limit]:
        record = json.loads(line)
        image = record.get("image")
        if image is not None and image not in uris:
            data = (data_root / image).read_bytes()
            uris[image] = f"data:image/png;base64,{base64.b64encode(data).decode()}"
        questions.append(Question(record["text"], uris.get(image)))
    return questions


def generated_questions(limit: int) -> list[Question]:
    """Questions about generated images (no data set needed: tests, any checkpoint)."""
    import io

    from ..testing import make_image

    texts = ["What is shown in the image?", "How many shapes are there?", "What color is the triangle?"]
    out = []
    for i in range(limit):
        buffer = io.BytesIO()
        make_image(i, (48, 40)).save(buffer, format="PNG")
        uri = f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"
        out.append(Question(texts[i % len(texts)], uri))
    return out


class ServerProcess:
    """``python -m llava_stf.serve.api`` on 127.0.0.1, a free port, in a subprocess; a context manager."""

    def __init__(self, model_path: Path, extra_args: Sequence[str] = (), start_timeout: float = 300.0):
        self.argv = [sys.executable, "-m", "llava_stf.serve.api", "--model-path", str(model_path), "--port", "0"]
        self.argv += ["--log-level", "warning", *extra_args]
        self.start_timeout, self.log = start_timeout, []
        self.process: subprocess.Popen | None = None
        self.base_url = self.model_id = ""

    def __enter__(self) -> ServerProcess:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen(
            self.argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
        )
        found = threading.Event()

        def read() -> None:  # keeps draining stderr so the server never blocks on it
            for line in self.process.stderr:
                self.log.append(line.rstrip())
                match = READY.search(line)
                if match and not found.is_set():
                    self.base_url, self.model_id = match["url"], match["model"]
                    found.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + self.start_timeout
        while not found.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise UserError(f"the server did not start: {' | '.join(self.log[-5:]) or 'no output'}")
        while time.monotonic() < deadline:  # listening; the app is up once /health answers
            try:
                self.health()
                return self
            except OSError:
                time.sleep(0.1)
        self.__exit__(None, None, None)
        raise UserError(f"the server at {self.base_url} never answered /health")

    def health(self) -> dict[str, Any]:
        url = self.base_url.removesuffix("/v1") + "/health"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)

    def cpu_seconds(self) -> float | None:
        """The server's CPU time so far (user + system, from /proc; None elsewhere)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        except (OSError, AttributeError):
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc: object) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.reader.join(10)  # it reads to the end of the server's stderr
        self.process.stderr.close()


@dataclass
class Outcome:
    """One request."""

    index: int
    latency: float = 0.0  # seconds, request sent to stream ended
    ttft: float | None = None  # seconds to the first non-empty content delta
    answer: str = ""
    answers: int = 0  # chunks carrying a finish_reason: exactly 1 when all is well
    error: str | None = None


@dataclass
class Level:
    """All requests of one concurrency level."""

    concurrency: int
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    batches: int = 0
    mean_batch: float = 0.0
    busy: float = 0.0  # fraction of the time the server's batcher was generating
    server_cpu: float | None = None  # CPU seconds the server used
    client_cpu: float = 0.0  # CPU seconds this process (the clients) used

    @property
    def done(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is None]

    @property
    def errors(self) -> int:
        return sum(o.error is not None for o in self.outcomes)

    @property
    def one_answer_each(self) -> bool:
        indices = [o.index for o in self.outcomes]
        return len(set(indices)) == len(indices) and all(o.answers == 1 for o in self.done)

    @property
    def rps(self) -> float:
        return len(self.done) / self.seconds if self.seconds > 0 else 0.0

    def latency(self, q: float) -> float:
        return percentile([o.latency for o in self.done], q)

    def ttft(self, q: float) -> float:
        return percentile([o.ttft for o in self.done if o.ttft is not None], q)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in (0, 1]); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def ask(client: Any, model: str, question: Question, max_tokens: int, index: int) -> Outcome:
    """One streamed chat completion."""
    outcome, start = Outcome(index), time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model, messages=question.messages(), max_tokens=max_tokens, temperature=0, stream=True
        )
        pieces = []
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    outcome.ttft = outcome.ttft or time.perf_counter() - start
                    pieces.append(choice.delta.content)
                outcome.answers += choice.finish_reason is not None
        outcome.answer = "".join(pieces)
    except Exception as err:  # counted and shown: any failure is an error of the run
        outcome.error = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
    outcome.latency = time.perf_counter() - start
    return outcome


def prompt_usage(server: ServerProcess, question: Question, max_tokens: int) -> tuple[int, int]:
    """``(prompt tokens, image tokens)`` the server reports in ``usage`` for ``question`` (one non-streamed request
    with the official sync client): what the LLM's prefill reads per request."""
    import openai

    with openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0) as client:
        reply = client.chat.completions.create(
            model=server.model_id, messages=question.messages(), max_tokens=max_tokens, temperature=0
        )
    return reply.usage.prompt_tokens, int(getattr(reply.usage, "image_tokens", 0) or 0)


def run_level(
    server: ServerProcess,
    questions: Sequence[Question],
    concurrency: int,
    requests: int,
    time_limit: float,
    max_tokens: int,
    timeout: float,
) -> Level:
    """``requests`` requests (fewer if ``time_limit`` seconds pass first) from ``concurrency`` concurrent clients."""
    level = Level(concurrency)
    before, cpu_before, clients_before = server.health(), server.cpu_seconds(), time.process_time()
    start = time.perf_counter()
    asyncio.run(_clients(server, questions, level, requests, start + time_limit, max_tokens, timeout))
    level.seconds = time.perf_counter() - start
    cpu_after, level.client_cpu = server.cpu_seconds(), time.process_time() - clients_before
    if cpu_before is not None and cpu_after is not None:
        level.server_cpu = cpu_after - cpu_before
    after = server.health()
    level.batches = after["batches"] - before["batches"]
    answered = after["answered"] - before["answered"]
    level.mean_batch = answered / level.batches if level.batches else 0.0
    level.busy = (after["busy_seconds"] - before["busy_seconds"]) / level.seconds
    level.outcomes.sort(key=lambda o: o.index)
    return level


async def _clients(server, questions, level: Level, requests: int, deadline: float, max_tokens: int, timeout: float):
    """``level.concurrency`` clients (asyncio tasks sharing one ``AsyncOpenAI``), each sending one request at a time."""
    import openai

    indices = iter(range(requests))
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=timeout)

    async def one_client() -> None:
        while time.perf_counter() < deadline and (index := next(indices, None)) is not None:
            question = questions[index % len(questions)]
            level.outcomes.append(await ask(client, server.model_id, question, max_tokens, index))

    try:
        await asyncio.gather(*(one_client() for _ in range(level.concurrency)))
    finally:
        await client.close()


__all__ = [
    "Level",
    "Outcome",
    "Question",
    "ServerProcess",
    "ask",
    "demo_questions",
    "generated_questions",
    "percentile",
    "prompt_usage",
    "run_level",
]
