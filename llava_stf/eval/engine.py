"""The evaluation engine: the only code that runs the model on benchmark questions.

``run_shard`` takes a benchmark's samples, keeps this process's shard (contiguous chunks of ceil(n / chunks)
questions, as LLaVA's ``CHUNKS``/``IDX`` scripts; ``torchrun`` ranks work the same way), skips every question already
answered in any part file, checks that every image it still needs exists **before** loading a model, and then
generates in batches with ``llava_stf.generation.Generator`` (greedy, left padding), appending each batch's answers to
the shard's part file (``llava_stf.eval.answers``). A progress bar shows answers/s. ``finalize`` merges the parts
into the upstream answers file once every question is answered; whichever process finishes last does it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from ..data.images import to_rgb
from ..generation import GenerationSettings, Generator, Request
from .answers import KEY, PartWriter, answered, merge, parts_dir, read_jsonl

logger = logging.getLogger(__name__)
MAX_LISTED = 20  # missing images named in the pre-flight error


@dataclass(frozen=True)
class InlineImage:
    """An image stored inside the question file (MMBench TSVs), base64-encoded."""

    data: str  # base64 of the encoded image file


@dataclass(frozen=True)
class Sample:
    """One question to answer, as a benchmark module loads it from the LLaVA eval layout."""

    key: str  # unique within the benchmark and stable across runs (see ``sample_keys``); resume and merge use it
    question_id: Any  # copied into the answer record
    text: str  # the user message without the image tag, benchmark suffix included
    prompt: str  # recorded as the answer's "prompt" (upstream: the question text, without the template)
    image: Path | InlineImage | None = None  # None: a text-only question (some ScienceQA problems)
    extra: Mapping[str, Any] = field(default_factory=dict)  # further answer fields (MMBench: round_id, options, ...)


class MissingImagesError(FileNotFoundError):
    """Images of unanswered questions are missing; raised before any model is loaded."""


def sample_keys(labels: Iterable[str]) -> list[str]:
    """Unique keys from per-question labels (usually the question id): ``label#n`` for its n-th occurrence.

    TextVQA and MME share one question id among the questions of an image; the occurrence number tells them apart
    and depends only on the question file.
    """
    counts: dict[str, int] = {}
    keys = []
    for label in labels:
        counts[label] = counts.get(label, -1) + 1
        keys.append(f"{label}#{counts[label]}")
    return keys


@dataclass(frozen=True)
class Shard:
    """This process's share of the questions: chunk ``index`` of ``count`` contiguous chunks."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"chunk index must be in [0, {self.count}), got {self.index} (of {self.count} chunks)")

    @classmethod
    def from_env(cls, count: int | None = None, index: int | None = None, env: Mapping[str, str] = os.environ) -> Shard:
        """Explicit values, else LLaVA's ``CHUNKS``/``IDX``, else torchrun's ``WORLD_SIZE``/``RANK``, else 1 chunk."""
        for count_name, index_name in (("CHUNKS", "IDX"), ("WORLD_SIZE", "RANK")):
            if count is None and count_name in env:
                count, index = int(env[count_name]), int(env.get(index_name, 0))
        return cls(index or 0, count or 1)

    def select(self, items: Sequence[Any]) -> list[Any]:
        size = -(-len(items) // self.count)  # ceil, as LLaVA's split_list
        return list(items[self.index * size : (self.index + 1) * size])


@dataclass(frozen=True)
class ShardReport:
    """What ``run_shard`` did."""

    shard: Shard
    questions: int  # in this shard
    already_answered: int  # in this shard, before this run
    generated: int
    seconds: float  # generation time, model loading excluded

    @property
    def answers_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def open_image(ref: Path | InlineImage) -> Image.Image:
    """Decode an image fully (so a corrupt file fails here) and convert it to RGB exactly as training does."""
    source = ref if isinstance(ref, Path) else io.BytesIO(base64.b64decode(ref.data))
    with Image.open(source) as image:
        image.load()
        return to_rgb(image)[0]


def missing_images(samples: Iterable[Sample]) -> list[Path]:
    """Image files that do not exist, each listed once, in question order."""
    seen: dict[Path, None] = {}
    for sample in samples:
        if isinstance(sample.image, Path) and sample.image not in seen and not sample.image.is_file():
            seen[sample.image] = None
    return list(seen)


def check_images(samples: Sequence[Sample], answers_file: Path | None = None) -> None:
    """Pre-flight: raise ``MissingImagesError`` listing the missing images of questions not answered yet.

    Args:
        samples: The benchmark's questions.
        answers_file: Its answers file; questions answered in its part files are not checked. None: check all.
    """
    done = answered(answers_file, _check_keys(samples)) if answers_file is not None else {}
    missing = missing_images(s for s in samples if s.key not in done)
    if missing:
        listed = "\n  ".join(str(p) for p in missing[:MAX_LISTED])
        more = f"\n  ... and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
        raise MissingImagesError(f"{len(missing)} image(s) of unanswered questions are missing:\n  {listed}{more}")


def _check_keys(samples: Sequence[Sample]) -> list[str]:
    keys = [s.key for s in samples]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ValueError(f"sample keys must be unique; repeated: {dupes}")
    return keys


def answer_id(model_id: str, key: str) -> str:
    """A short id for an answer, derived from model and question so reruns and merges are reproducible."""
    return hashlib.sha1(f"{model_id}\n{key}".encode()).hexdigest()[:22]


def _load_batch(batch: Sequence[Sample]) -> list[Image.Image | None]:
    images = []
    for sample in batch:
        try:
            images.append(open_image(sample.image) if sample.image is not None else None)
        except Exception as err:  # PIL raises several types for unreadable files
            where = sample.image if isinstance(sample.image, Path) else "the inline image"
            raise OSError(
                f"question {sample.question_id!r}: cannot read {where}: {err}. Answers so far are saved; "
                "replace the file and rerun to continue"
            ) from err
    return images


def run_shard(
    samples: Sequence[Sample],
    answers_file: Path,
    load_generator: Callable[[], Generator],
    *,
    model_id: str,
    settings: GenerationSettings,
    batch_size: int = 1,
    shard: Shard = Shard(),
    progress: bool = True,
    label: str | None = None,
) -> ShardReport:
    """Answer this shard's unanswered questions, appending to its part file.

    Args:
        samples: Every question of the benchmark, in question-file order.
        answers_file: The final (merged) answers file; part files go to ``parts_dir(answers_file)``.
        load_generator: Called once, only if something is left to answer.
        model_id: Recorded in each answer (upstream: the checkpoint folder name).
        settings: Decoding settings.
        batch_size: Requests per ``generate`` call.
        shard: This process's chunk.
        progress: Show a progress bar (answers/s).
        label: Its title (default: the answers file name).

    Raises:
        MissingImagesError: Before loading the model, if images of unanswered questions are missing.
        OSError: If an image cannot be decoded (answers generated so far are kept).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keys = _check_keys(samples)
    mine = shard.select(samples)
    done = answered(answers_file, keys)
    pending = [s for s in mine if s.key not in done]
    report = ShardReport(shard, len(mine), len(mine) - len(pending), 0, 0.0)
    if not pending:
        return report
    check_images(samples, answers_file)
    with PartWriter(answers_file, shard.count, shard.index) as writer:
        done = answered(answers_file, keys)  # again, now that this shard's file is locked and repaired
        pending = sorted((s for s in mine if s.key not in done), key=lambda s: -len(s.text))
        generator = load_generator()
        batches = [pending[i : i + batch_size] for i in range(0, len(pending), batch_size)]
        desc = f"{label or answers_file.name} [chunk {shard.index + 1}/{shard.count}]"
        bar = tqdm(
            total=len(mine),
            initial=len(mine) - len(pending),
            unit="ans",
            desc=desc,
            disable=not progress,
            position=shard.index,
        )
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1) as pool, bar:
            upcoming = pool.submit(_load_batch, batches[0])
            for i, batch in enumerate(batches):
                images = upcoming.result()
                if i + 1 < len(batches):
                    upcoming = pool.submit(_load_batch, batches[i + 1])  # decode the next images while generating
                texts = generator.generate([Request.single(s.text, img) for s, img in zip(batch, images)], settings)
                writer.append([_record(s, text, model_id) for s, text in zip(batch, texts)])
                bar.update(len(batch))
        seconds = time.perf_counter() - start
    report = ShardReport(shard, len(mine), len(mine) - len(pending), len(pending), seconds)
    logger.info("generated %d answers in %.1f s (%.2f answers/s)", len(pending), seconds, report.answers_per_second)
    return report


def _record(sample: Sample, text: str, model_id: str) -> dict[str, Any]:
    return {
        "question_id": sample.question_id,
        "prompt": sample.prompt,
        "text": text,
        **sample.extra,
        "answer_id": answer_id(model_id, sample.key),
        "model_id": model_id,
        "metadata": {},
        KEY: sample.key,
    }


def finalize(samples: Sequence[Sample], answers_file: Path) -> list[dict[str, Any]] | None:
    """The complete answers in question order, merging the part files; None while questions are unanswered.

    An answers file without part files (an earlier run, or one written by upstream LLaVA) is used as it is when its
    question ids are exactly those of the question file, in order.

    Raises:
        ValueError: If such a file does not match the question file.
    """
    keys = _check_keys(samples)
    if answers_file.is_file() and not parts_dir(answers_file).is_dir():
        records = read_jsonl(answers_file)
        if [r.get("question_id") for r in records] != [s.question_id for s in samples]:
            raise ValueError(
                f"{answers_file} holds {len(records)} answers that do not match the {len(samples)} questions "
                "(and it has no part files to resume from); move it away or pass --overwrite"
            )
        return records
    return merge(answers_file, keys)


def remove_answers(answers_file: Path) -> None:
    """Delete the answers file and its part files (``--overwrite``)."""
    answers_file.unlink(missing_ok=True)
    shutil.rmtree(parts_dir(answers_file), ignore_errors=True)


def count_answered(samples: Sequence[Sample], answers_file: Path) -> int:
    return len(answered(answers_file, _check_keys(samples)))


__all__ = [
    "InlineImage",
    "MissingImagesError",
    "Sample",
    "Shard",
    "ShardReport",
    "answer_id",
    "check_images",
    "count_answered",
    "finalize",
    "missing_images",
    "open_image",
    "remove_answers",
    "run_shard",
    "sample_keys",
]
