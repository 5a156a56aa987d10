"""The evaluation engine: the only code that runs the model on benchmark questions.

``run_shard`` takes a benchmark's samples, keeps this process's shard (contiguous chunks of ceil(n / chunks)
questions, as LLaVA's ``CHUNKS``/``IDX`` scripts; ``torchrun`` ranks work the same way), skips every question already
answered in any part file, checks every image it still needs **before** loading a model (``check_images``: each one
decoded by the training loader, ``llava_stf.data.images.load_image``, under the same ``ImageLimits``), and then
generates in batches with ``llava_stf.generation.Generator`` (greedy, left padding), appending each batch's answers to
the shard's part file (``llava_stf.eval.answers``). A progress bar shows answers/s. ``finalize`` merges the parts
into the upstream answers file once every question is answered; whichever process finishes last does it.

Given a ``Provenance`` (checkpoint digest, question-file digest, generation settings), ``run_shard`` records it beside
the answers before writing the first one and refuses to add to answers recorded with another (``StaleAnswersError``,
naming what differs), or with none.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
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

from ..data.images import UNREADABLE_IMAGE, ImageLimits, decode_image_bytes, load_image
from ..data.tokenization import SkippedSample
from ..errors import UserError
from ..generation import GenerationSettings, Generator, Request
from ..provenance import Provenance
from .answers import (
    KEY,
    PartWriter,
    answered,
    has_answers,
    merge,
    parts_dir,
    provenance_file,
    read_jsonl,
    read_provenance,
    write_provenance,
)

logger = logging.getLogger(__name__)
MAX_LISTED = 20  # unusable images named in the pre-flight error
CHECK_WORKERS = min(8, os.cpu_count() or 1)  # threads decoding images in the pre-flight (PIL releases the GIL)


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


class ImageCheckError(UserError):
    """Images of unanswered questions are missing, unreadable or over the size limits; raised before any model loads."""


class StaleAnswersError(UserError):
    """Saved answers were made by another checkpoint, question file or generation settings (or nobody knows by what)."""


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


def open_image(ref: Path | InlineImage, limits: ImageLimits | None = None) -> Image.Image:
    """Decode an image with the training loader (``load_image``): the same size limits and the same RGB conversion.

    Raises:
        SkippedSample: ``missing_image``, ``unreadable_image``, ``truncated_image`` or ``image_too_large``.
    """
    if isinstance(ref, Path):
        return load_image(ref, limits)[0]
    try:
        data = base64.b64decode(ref.data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise SkippedSample(UNREADABLE_IMAGE, f"the inline image is not valid base64: {err}") from None
    return decode_image_bytes(data, "the inline image", limits)[0]


def image_problem(ref: Path | InlineImage, limits: ImageLimits | None = None) -> str | None:
    """Why ``ref`` cannot be used (``"missing_image: ..."``), or None when it decodes within ``limits``."""
    try:
        open_image(ref, limits)
    except SkippedSample as err:
        return str(err)
    return None


def check_images(
    samples: Sequence[Sample],
    answers_file: Path | None = None,
    shard: Shard | None = None,
    limits: ImageLimits | None = None,
) -> None:
    """Pre-flight: decode every image of the shard's unanswered questions; raise one error listing the bad ones.

    Args:
        samples: The benchmark's questions.
        answers_file: Its answers file; questions answered in its part files are not checked. None: check all.
        shard: Only this shard's questions (default: all).
        limits: Image size limits (default ``ImageLimits()``, as training and chat).

    Raises:
        ImageCheckError: Naming each missing, unreadable, truncated or too large image.
    """
    done = answered(answers_file, _check_keys(samples)) if answers_file is not None else {}
    mine = shard.select(samples) if shard is not None else samples
    refs: dict[Any, tuple[str, Path | InlineImage]] = {}  # each file once; inline images named by their question
    for s in mine:
        if s.image is not None and s.key not in done:
            label = "" if isinstance(s.image, Path) else f"question {s.question_id!r}: "
            refs.setdefault(s.image if isinstance(s.image, Path) else s.key, (label, s.image))
    if len(refs) > 100:
        logger.info("checking %d images of unanswered questions", len(refs))
    with ThreadPoolExecutor(max_workers=CHECK_WORKERS) as pool:
        found = list(pool.map(lambda ref: image_problem(ref, limits), (ref for _, ref in refs.values())))
    problems = [label + problem for (label, _), problem in zip(refs.values(), found) if problem is not None]
    if problems:
        more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        header = f"{len(problems)} image(s) of unanswered questions cannot be used (replace or remove them)"
        raise ImageCheckError(f"{header}: {'; '.join(problems[:MAX_LISTED])}{more}")


def provenance_conflict(answers_file: Path, current: Provenance) -> str | None:
    """Why the answers saved for ``answers_file`` must not be reused with ``current``; None when they may be.

    None also when nothing is saved yet.
    """
    if not has_answers(answers_file):
        return None
    recorded = read_provenance(answers_file)
    if recorded is None:
        return (
            f"{answers_file} holds answers with no provenance record ({provenance_file(answers_file).name}): they "
            "were written by upstream LLaVA or before records were kept, so which checkpoint, questions and settings "
            "made them is unknown"
        )
    differences = recorded.differences(current)
    if differences:
        return f"the answers in {answers_file} differ from this run in {'; '.join(differences)}"
    return None


def _check_keys(samples: Sequence[Sample]) -> list[str]:
    keys = [s.key for s in samples]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ValueError(f"sample keys must be unique; repeated: {dupes}")
    return keys


def answer_id(model_id: str, key: str) -> str:
    """A short id for an answer, derived from model and question so reruns and merges are reproducible."""
    return hashlib.sha1(f"{model_id}\n{key}".encode()).hexdigest()[:22]


def _load_batch(batch: Sequence[Sample], limits: ImageLimits | None) -> list[Image.Image | None]:
    images = []
    for sample in batch:
        try:
            images.append(open_image(sample.image, limits) if sample.image is not None else None)
        except SkippedSample as err:  # the file changed after the pre-flight, or the pre-flight was skipped
            where = sample.image if isinstance(sample.image, Path) else "the inline image"
            raise ImageCheckError(
                f"question {sample.question_id!r}: cannot read {where}: {err}. Answers so far are saved; "
                "replace the file and rerun to continue"
            ) from None
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
    provenance: Provenance | None = None,
    image_limits: ImageLimits | None = None,
    check: bool = True,
) -> ShardReport:
    """Answer this shard's unanswered questions, appending to its part file.

    Args:
        samples: Every question of the benchmark, in question-file order.
        answers_file: The final (merged) answers file; part files go to ``parts_dir(answers_file)``.
        load_generator: Called once, only if something is left to answer.
        model_id: Recorded in each answer (the CLI's default: folder name + digest, ``stage2-1a2b3c4d``).
        settings: Decoding settings.
        batch_size: Requests per ``generate`` call.
        shard: This process's chunk.
        progress: Show a progress bar (answers/s).
        label: Its title (default: the answers file name).
        provenance: What produces the answers: recorded before the first one; saved answers with another record
            (or none) are refused. None: no record kept (benchmarks of the engine itself).
        image_limits: Size limits of the images (default ``ImageLimits()``).
        check: Decode the shard's images before loading the model (off when the caller did it already).

    Raises:
        StaleAnswersError: If saved answers have another provenance (or none) than ``provenance``.
        ImageCheckError: Before loading the model, if images of unanswered questions are missing or unusable;
            during generation, if an image became unreadable (answers generated so far are kept).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keys = _check_keys(samples)
    if provenance is not None:
        conflict = provenance_conflict(answers_file, provenance)
        if conflict:
            raise StaleAnswersError(f"{conflict}; pass --overwrite to answer again")
        if read_provenance(answers_file) is None or not has_answers(answers_file):
            write_provenance(answers_file, provenance)  # before the first part file
    mine = shard.select(samples)
    done = answered(answers_file, keys)
    pending = [s for s in mine if s.key not in done]
    report = ShardReport(shard, len(mine), len(mine) - len(pending), 0, 0.0)
    if not pending:
        return report
    if check:
        check_images(samples, answers_file, shard, image_limits)
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
            upcoming = pool.submit(_load_batch, batches[0], image_limits)
            for i, batch in enumerate(batches):
                images = upcoming.result()
                if i + 1 < len(batches):
                    # decode the next images while generating
                    upcoming = pool.submit(_load_batch, batches[i + 1], image_limits)
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
    """Delete the answers file, its part files and its provenance record (``--overwrite``, once inputs are checked)."""
    answers_file.unlink(missing_ok=True)
    shutil.rmtree(parts_dir(answers_file), ignore_errors=True)
    provenance_file(answers_file).unlink(missing_ok=True)


def count_answered(samples: Sequence[Sample], answers_file: Path) -> int:
    return len(answered(answers_file, _check_keys(samples)))


__all__ = [
    "ImageCheckError",
    "InlineImage",
    "Sample",
    "Shard",
    "ShardReport",
    "answer_id",
    "check_images",
    "count_answered",
    "finalize",
    "image_problem",
    "open_image",
    "provenance_conflict",
    "remove_answers",
    "run_shard",
    "sample_keys",
    "StaleAnswersError",
]
