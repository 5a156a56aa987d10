"""The LLaVA JSON training set: records checked up front, images and tokens loaded lazily, bad samples counted.

A data file is a JSON list (or JSON lines) of ``{"id", "image" (optional), "conversations": [{"from", "value"}]}``
(haotian-liu/LLaVA ``docs/Finetune_Custom_Data.md`` and ``llava/train/train.py``). Loading happens in two places,
and each refuses bad input with a named reason:

- at construction (cheap, whole file): the record's structure (``malformed_record``), the ``<image>`` tag against
  the ``image`` field (``image_tag_mismatch``: an image without a tag, a tag without an image, a tag outside the
  first human turn) and the conversation template (``template_mismatch``, e.g. a multi-turn record under ``plain``).
  These records are dropped and counted before training starts;
- in ``__getitem__`` (lazy, per sample): tokenization with truncation to ``max_length``
  (``llava_stf.data.tokenization``: ``no_supervision``, ``special_token_in_text``) and the image file
  (``llava_stf.data.images``: ``missing_image``, ``unreadable_image``, ``truncated_image``, ``image_too_large``).
  A bad sample is replaced by the next good one (index ``i + 1``, ``i + 2``, ...), so the data order stays a pure
  function of the sampler's order, and the replacement is logged and reported in the item's ``data_events``, which
  the trainer counts.

``on_bad_sample="error"`` makes every one of these fatal (``BadSampleError``), at construction or at first use.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from .conversation import HUMAN, IMAGE_TOKEN, ROLES, Template, Turn, normalize_record
from .images import ImageLimits, load_image
from .tokenization import SkippedSample, tokenize_conversation

if TYPE_CHECKING:
    from llava_stf.model import LlavaStfProcessor

logger = logging.getLogger(__name__)

MALFORMED_RECORD = "malformed_record"
IMAGE_TAG_MISMATCH = "image_tag_mismatch"
TEMPLATE_MISMATCH = "template_mismatch"
RECORD_REASONS = (MALFORMED_RECORD, IMAGE_TAG_MISMATCH, TEMPLATE_MISMATCH)
ON_BAD_SAMPLE = ("skip", "error")


class BadSampleError(RuntimeError):
    """A bad sample met with ``on_bad_sample="error"``, or too many bad samples in a row."""


@dataclass(frozen=True)
class Sample:
    """One checked record."""

    index: int  # position in the data file
    id: str  # the record's "id" (or its index when absent)
    image: str | None  # path relative to the image folder; None for a text-only sample
    turns: tuple[Turn, ...]  # normalised turns (``<image>`` at the front of the first one)


def load_records(path: str | Path) -> list[Any]:
    """Read a LLaVA data file: a JSON list, or JSON lines when the suffix is ``.jsonl``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{str(path)!r} must hold a JSON list of records, got a {type(data).__name__}")
    return data


def parse_record(index: int, record: Any, template: Template | None = None) -> Sample:
    """Check one record and normalise its turns (``normalize_record``); raise ``SkippedSample`` with the reason."""
    if not isinstance(record, Mapping):
        raise SkippedSample(MALFORMED_RECORD, f"record {index} is a {type(record).__name__}, not an object")
    sample_id = str(record.get("id", index))
    where = f"record {index} (id {sample_id!r})"
    messages = record.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise SkippedSample(MALFORMED_RECORD, f"{where} has no 'conversations' list")
    for message in messages:
        ok = isinstance(message, Mapping) and message.get("from") in ROLES and isinstance(message.get("value"), str)
        if not ok:
            raise SkippedSample(MALFORMED_RECORD, f"{where}: bad message {str(message)[:120]} (needs from in {ROLES})")
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise SkippedSample(MALFORMED_RECORD, f"{where}: 'image' must be one relative path, got {image!r}")
    kept = messages if messages[0]["from"] == HUMAN else messages[1:]  # upstream drops a leading gpt turn
    tags = [m["value"].count(IMAGE_TOKEN) for m in kept]
    if image is not None and not (tags and tags[0] >= 1 and sum(tags[1:]) == 0):
        raise SkippedSample(IMAGE_TAG_MISMATCH, f"{where} has an image, so its first human turn needs {IMAGE_TOKEN}")
    if image is None and sum(tags):
        raise SkippedSample(IMAGE_TAG_MISMATCH, f"{where} has no 'image' but its text holds {IMAGE_TOKEN}")
    try:
        turns = normalize_record(record)
    except ValueError as err:
        raise SkippedSample(MALFORMED_RECORD, str(err)) from None
    if template is not None:
        try:
            template.spans(turns)
        except ValueError as err:
            raise SkippedSample(TEMPLATE_MISMATCH, f"{where}: template {template.name!r}: {err}") from None
    return Sample(index, sample_id, image, turns)


def parse_records(
    records: Sequence[Any], template: Template | None = None
) -> tuple[list[Sample], Counter[str], dict[str, list[str]]]:
    """``parse_record`` over a file: the good samples, bad-record counts by reason, and up to 3 messages each."""
    samples, counts, examples = [], Counter(), {}
    for index, record in enumerate(records):
        try:
            samples.append(parse_record(index, record, template))
        except SkippedSample as err:
            counts[err.reason] += 1
            examples.setdefault(err.reason, [])
            if len(examples[err.reason]) < 3:
                examples[err.reason].append(str(err))
    return samples, counts, examples


class LazySupervisedDataset(Dataset):
    """Training samples as ``{"input_ids": [T], "labels": [T], "pixel_values": [3, H, W] | None, "data_events"}``.

    Args:
        records: the data file's records (``load_records``).
        processor: a ``LlavaStfProcessor`` (tokenizer, image mode, ``num_image_tokens``).
        template: the conversation template (``get_template``).
        image_folder: root of the records' ``image`` paths; required when any record has an image.
        max_length: ``model_max_length``; truncation counts the expanded image tokens.
        on_bad_sample: ``"skip"`` (replace, count, log) or ``"error"`` (raise ``BadSampleError``).
        image_limits: size limits for image files (default ``ImageLimits()``).
        max_consecutive_bad: give up (``BadSampleError``) after this many bad samples in a row.
    """

    def __init__(
        self,
        records: Sequence[Any],
        processor: LlavaStfProcessor,
        template: Template,
        image_folder: str | Path | None = None,
        max_length: int | None = None,
        on_bad_sample: str = "skip",
        image_limits: ImageLimits | None = None,
        max_consecutive_bad: int = 32,
    ):
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        self.processor, self.template, self.max_length = processor, template, max_length
        self.on_bad_sample, self.max_consecutive_bad = on_bad_sample, max_consecutive_bad
        self.image_limits = image_limits or ImageLimits()
        self.samples, self.skipped_records, examples = parse_records(records, template)
        if self.skipped_records:
            summary = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped_records.items()))
            details = "; ".join(msg for msgs in examples.values() for msg in msgs[:1])
            if on_bad_sample == "error":
                raise BadSampleError(f"bad records ({summary}), e.g. {details}")
            logger.warning("dropped %d of %d records (%s), e.g. %s", sum(self.skipped_records.values()),
                           len(records), summary, details)  # fmt: skip
        if not self.samples:
            raise ValueError(f"no usable record among {len(records)} (template {template.name!r})")
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self._check_image_folder()
        words = [sum(len(t.text.split()) for t in s.turns) for s in self.samples]
        # Length proxies of the sampler (``LazySupervisedDataset.modality_lengths`` in haotian-liu/LLaVA
        # ``llava/train/train.py``): word counts, negative for text-only samples.
        self.modality_lengths = [n if s.image is not None else -n for n, s in zip(words, self.samples)]
        image_tokens = [processor.num_image_tokens if s.image is not None else 0 for s in self.samples]
        self.lengths = [n + extra for n, extra in zip(words, image_tokens)]

    def _check_image_folder(self) -> None:
        with_image = [s for s in self.samples if s.image is not None]
        if not with_image:
            return
        if self.image_folder is None:
            raise ValueError(f"{len(with_image)} records have an 'image' but no image_folder was given")
        probe = with_image[:: max(1, len(with_image) // 64)][:64]
        if not any((self.image_folder / s.image).is_file() for s in probe):
            raise FileNotFoundError(
                f"none of {len(probe)} probed images exists under image_folder={str(self.image_folder)!r} "
                f"(e.g. {str(self.image_folder / probe[0].image)!r}); check image_folder, or run "
                "python -m llava_stf.data.validate"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def build(self, sample: Sample) -> dict[str, Any]:
        """Tokenize one sample and load its image; raises ``SkippedSample`` for a bad one."""
        tokenized = tokenize_conversation(
            sample.turns, self.template, self.processor.tokenizer, self.processor, max_length=self.max_length
        )
        pixel_values = None
        if sample.image is not None:
            image, _ = load_image(self.image_folder / sample.image, self.image_limits)
            pixel_values = self.processor.preprocess_images([image])[0]
        return {
            "input_ids": torch.tensor(tokenized.input_ids, dtype=torch.long),
            "labels": torch.tensor(tokenized.labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "data_events": {"skipped": [], "truncated": int(tokenized.truncated)},
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        skipped: list[str] = []
        for attempt in range(self.max_consecutive_bad + 1):
            sample = self.samples[(i + attempt) % len(self.samples)]
            try:
                item = self.build(sample)
            except SkippedSample as err:
                where = f"sample {sample.id!r} (record {sample.index})"
                if self.on_bad_sample == "error":
                    raise BadSampleError(f"{where}: {err} (on_bad_sample=error)") from err
                logger.warning("skipping %s: %s", where, err)
                skipped.append(err.reason)
                continue
            item["data_events"]["skipped"] = skipped
            return item
        raise BadSampleError(
            f"{len(skipped)} bad samples in a row from index {i} ({Counter(skipped)}); the data or image_folder is "
            "probably wrong: run python -m llava_stf.data.validate"
        )


__all__ = [
    "IMAGE_TAG_MISMATCH",
    "MALFORMED_RECORD",
    "ON_BAD_SAMPLE",
    "RECORD_REASONS",
    "TEMPLATE_MISMATCH",
    "BadSampleError",
    "LazySupervisedDataset",
    "Sample",
    "load_records",
    "parse_record",
    "parse_records",
]
