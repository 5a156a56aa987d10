"""Dynamic batching: one worker thread groups queued jobs into batches for ``ServeEngine.run``.

The worker takes every job that is waiting when it becomes free. When it was idle and its previous batch held more
than one job (clients are sending concurrently), it first waits up to ``window`` seconds (10 ms by default) for more
to arrive; after a batch of one (a lone client) it starts at once, so a single client never pays the window. It then
takes the oldest job's group (``Job.group``: all greedy jobs with the same system prompt together; sampling jobs with
the same settings together; a seeded sampling job alone, so its seed alone decides its answer) up to ``max_batch``
jobs, in arrival order, and runs them as one batch. Jobs of other groups wait for the next batch. New jobs do not join
a running batch (no continuous batching), but each row's answer is delivered as soon as it ends.

The queue is bounded: ``submit`` raises ``QueueFull`` when ``max_queue`` jobs are waiting, which the API answers with
429 and ``Retry-After``. A cancelled job (its client disconnected) is dropped if it has not started; if it is running,
its row stops at the next token and its output is discarded (``ServeEngine``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from .engine import Job, ServeEngine
from .openai_schema import ApiError

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """``max_queue`` jobs are already waiting."""


class Batcher:
    """The queue and the worker thread in front of one ``ServeEngine``.

    Args:
        engine: Runs each batch.
        max_batch: The most jobs in one batch.
        max_queue: The most jobs waiting (not yet running) before ``submit`` refuses.
        window: Seconds an idle worker waits after the first job for others to batch with it.
    """

    def __init__(self, engine: ServeEngine, max_batch: int = 16, max_queue: int = 64, window: float = 0.01):
        if max_batch < 1 or max_queue < 1 or window < 0:
            raise ValueError(
                f"need max_batch >= 1, max_queue >= 1, window >= 0; got {max_batch}, {max_queue}, {window}"
            )
        self.engine, self.max_batch, self.max_queue, self.window = engine, max_batch, max_queue, window
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=10_000)  # the latest batches
        self.counts = collections.Counter()  # batches, answered, cancelled_waiting, cancelled_running, failed
        self.running = 0
        self.busy = 0.0  # seconds spent in engine.run
        self._last_size = 0  # the previous batch's size: > 1 means concurrent clients, worth waiting for
        self.on_batch: Callable[[list[Job]], None] | None = None  # called before each batch runs (tests)

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="llava-stf-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the running batch; jobs still waiting get a 503."""
        with self._cond:
            self._stopping = True
            left, self._waiting = list(self._waiting), collections.deque()
            self._cond.notify_all()
        for job in left:
            job.sink("error", ApiError(503, "the server is shutting down", type="server_error"))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue ``job``; its sink will get its events from the worker thread.

        Raises:
            QueueFull: When ``max_queue`` jobs are waiting.
        """
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.append(job)
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def stats(self) -> dict[str, float | int]:
        sizes = list(self.batch_sizes)
        return {
            "waiting": self.waiting,
            "running": self.running,
            **{
                name: self.counts[name]
                for name in ("batches", "answered", "cancelled_waiting", "cancelled_running", "failed")
            },
            "mean_batch": round(sum(sizes) / len(sizes), 3) if sizes else 0.0,
            "max_batch_seen": max(sizes, default=0),
            "busy_seconds": round(self.busy, 3),
        }

    def _next_batch(self) -> list[Job] | None:
        """Wait for jobs, then take the oldest job's group (None: stopping)."""
        with self._cond:
            while not self._stopping and not self._waiting:
                self._cond.wait(0.5)
            deadline = time.monotonic() + (self.window if self._last_size > 1 else 0.0)
            while not self._stopping and len(self._waiting) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._stopping:
                return None
            dropped = [job for job in self._waiting if job.cancelled]
            self.counts["cancelled_waiting"] += len(dropped)
            jobs = [job for job in self._waiting if not job.cancelled]
            if not jobs:
                self._waiting.clear()
                return []
            group = jobs[0].group
            batch = [job for job in jobs if job.group == group][: self.max_batch]
            chosen = set(map(id, batch))
            self._waiting = collections.deque(job for job in jobs if id(job) not in chosen)
            self.running = self._last_size = len(batch)
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            if self.on_batch is not None:
                self.on_batch(batch)
            self.batch_sizes.append(len(batch))
            self.counts["batches"] += 1
            start = time.perf_counter()
            try:
                self.engine.run(batch)
            except Exception as err:  # a bug or a resource failure: its open jobs hear of it; the server goes on
                logger.exception("a batch of %d failed", len(batch))
                error = ApiError(500, f"generation failed: {type(err).__name__}: {err}", type="server_error")
                for job in batch:
                    if not job.finished and not job.cancelled:
                        job.sink("error", error)
            self.busy += time.perf_counter() - start
            self.counts["answered"] += sum(job.finished for job in batch)
            self.counts["cancelled_running"] += sum(job.cancelled for job in batch)
            self.counts["failed"] += sum(not job.finished and not job.cancelled for job in batch)
            self.running = 0


__all__ = ["Batcher", "QueueFull"]
