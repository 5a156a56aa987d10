"""The LLaVA JSON training set: records checked up front, images and tokens loaded lazily, bad samples counted.

A data file is a JSON list (or JSON lines) of ``{"id", "image" (optional), "conversations": [{"from", "value"}]}``
(haotian-liu/LLaVA ``docs/Finetune_Custom_Data.md`` and ``llava/train/train.py``). Loading happens in two places,
and each refuses bad input with a named reason:

- at load time (``check_records``: cheap, whole file, before any model is loaded): the record's structure
  (``malformed_record``, also a JSON-lines line that is not JSON), the ``<image>`` tag against the ``image`` field
  (``image_tag_mismatch``: an image without a tag, a tag without an image, a tag outside the first human turn) and
  the conversation template (``template_mismatch``, e.g. a multi-turn record under ``plain``). These records are
  dropped and counted before training starts; a file with no record, or no usable one, is an error;
- in ``__getitem__`` (lazy, per sample): tokenization with truncation to ``max_length``
  (``llava_stf.data.tokenization``: ``no_supervision``, ``special_token_in_text``) and the image file
  (``llava_stf.data.images``: ``missing_image``, ``unreadable_image``, ``truncated_image``, ``image_too_large``).
  A bad sample is replaced by the next good one (index ``i + 1``, ``i + 2``, ...), so the data order stays a pure
  function of the sampler's order, and the replacement is logged and reported in the item's ``data_events``, which
  the trainer counts.

``too_many_bad`` is the one rule for how much bad data a run takes (``max_bad_sample_fraction``); training and
``python -m llava_stf.data.validate`` both apply it. ``on_bad_sample="error"`` makes every bad record or sample
fatal (``BadSampleError``), at load time or at first use.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from llava_stf.errors import UserError

from .conversation import HUMAN, IMAGE_TOKEN, ROLES, Template, Turn, normalize_record
from .image_cache import ImageCache
from .images import ImageLimits, load_image
from .tokenization import ImageTokens, SkippedSample, tokenize_conversation

if TYPE_CHECKING:
    from llava_stf.model import LlavaStfProcessor

logger = logging.getLogger(__name__)

MALFORMED_RECORD = "malformed_record"
IMAGE_TAG_MISMATCH = "image_tag_mismatch"
TEMPLATE_MISMATCH = "template_mismatch"
RECORD_REASONS = (MALFORMED_RECORD, IMAGE_TAG_MISMATCH, TEMPLATE_MISMATCH)
ON_BAD_SAMPLE = ("skip", "error")
MAX_BAD_SAMPLE_FRACTION = 0.05  # default share of bad data a run takes (``too_many_bad``)
TOLERANCE_SIGMAS = 3.0  # binomial standard deviations a bad count may exceed the limit by


class BadSampleError(UserError):
    """Bad data past what the run takes: ``on_bad_sample="error"``, ``max_bad_sample_fraction``, or many in a row."""


def tolerance(limit: float, n: int) -> float:
    """Slack on a count of bad items among ``n``: ``TOLERANCE_SIGMAS`` binomial standard deviations at ``limit``."""
    return TOLERANCE_SIGMAS * math.sqrt(max(limit * (1.0 - limit), 0.0) * n)


def bad_share(records: int, dropped: int, drawn: int = 0, skipped: int = 0) -> float:
    """Estimated share of bad data: ``dropped / records + (1 - dropped / records) * skipped / drawn``."""
    share = dropped / records if records else 0.0
    return share + (1.0 - share) * (skipped / drawn if drawn else 0.0)


def too_many_bad(limit: float, records: int, dropped: int, drawn: int = 0, skipped: int = 0) -> bool:
    """The bad-sample rule, judged from the first draw (and before it, on the records dropped at load time).

    The share of bad data is ``bad_share``: the records dropped when the file was read, plus the surviving
    records' share of draws skipped in training (missing image, no supervision, ...). It must stay within ``limit``.
    Each count gets a tolerance of ``TOLERANCE_SIGMAS`` binomial standard deviations at the limit, so chance alone
    does not stop a run whose data is within it, and a small data set survives a single bad record (10 records
    with 1 bad is fine at 0.05), while a half-malformed file stops before a model is loaded and a data set whose
    images are half missing stops within the first batches:

    - load time: stop when ``dropped > limit * records + tolerance(limit, records)``;
    - draws: the dropped share uses up part of the limit, the draws get the rest,
      ``budget = (limit - dropped / records) / (1 - dropped / records)``; stop when
      ``skipped > budget * drawn + tolerance(limit, drawn)``.

    Args:
        limit: ``max_bad_sample_fraction``.
        records: records in the data file.
        dropped: records dropped at load time.
        drawn: samples drawn so far (skipped ones included).
        skipped: draws skipped as bad.
    """
    if dropped > limit * records + tolerance(limit, records):
        return True
    share = dropped / records if records else 0.0
    budget = max(0.0, (limit - share) / (1.0 - share)) if share < 1.0 else 0.0
    return skipped > budget * drawn + tolerance(limit, drawn)


@dataclass(frozen=True)
class MalformedLine:
    """A JSON-lines line that is not a JSON value; kept in place so it is counted as a ``malformed_record``."""

    line: int  # 1-based line number in the file
    error: str  # what the JSON parser said


@dataclass(frozen=True)
class Sample:
    """One checked record."""

    index: int  # position in the data file
    id: str  # the record's "id" (or its index when absent)
    image: str | None  # path relative to the image folder; None for a text-only sample
    turns: tuple[Turn, ...]  # normalised turns (``<image>`` at the front of the first one)


def load_records(path: str | Path) -> list[Any]:
    """Read a LLaVA data file: a JSON list, or JSON lines when the suffix is ``.jsonl``.

    A JSON-lines line that is not JSON (or not UTF-8) becomes a ``MalformedLine`` record, which ``parse_record``
    counts as ``malformed_record``; a ``.json`` file that does not parse is an error naming the line and column.

    Raises:
        FileNotFoundError: no such file.
        UserError: a ``.json`` file that is not a JSON list, or a file with no record at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".jsonl":
        records: list[Any] = []
        with path.open("rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line.decode("utf-8-sig").rstrip()))
                except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
                    records.append(MalformedLine(number, _json_error(err, one_line=True)))
    else:
        try:
            with path.open(encoding="utf-8-sig") as f:
                records = json.load(f)
        except json.JSONDecodeError as err:
            if not err.doc.strip():
                records = []
            else:
                hint = " (one record per line is JSON lines: name the file .jsonl)" if err.msg == "Extra data" else ""
                raise UserError(f"data file {str(path)!r} is not valid JSON: {_json_error(err)}{hint}") from None
        except UnicodeDecodeError as err:
            raise UserError(f"data file {str(path)!r} is {_json_error(err)}") from None
        if not isinstance(records, list):
            raise UserError(f"data file {str(path)!r} must hold a JSON list of records, got a {type(records).__name__}")
    if not records:
        raise UserError(f"data file {str(path)!r} holds no records")
    return records


def _json_error(err: ValueError, one_line: bool = False) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} (column {err.colno})" if one_line else f"{err.msg} (line {err.lineno}, column {err.colno})"
    if isinstance(err, UnicodeDecodeError):  # a byte offset only within one line (a file is decoded in chunks)
        return f"not UTF-8 text (byte {err.start}: {err.reason})" if one_line else f"not UTF-8 text ({err.reason})"
    return str(err)


def parse_record(index: int, record: Any, template: Template | None = None) -> Sample:
    """Check one record and normalise its turns (``normalize_record``); raise ``SkippedSample`` with the reason."""
    if isinstance(record, MalformedLine):
        raise SkippedSample(MALFORMED_RECORD, f"line {record.line} is not a JSON record: {record.error}")
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


@dataclass(frozen=True)
class CheckedRecords:
    """A data file's records after the load-time checks (``check_records``)."""

    samples: list[Sample]  # the usable records, in file order
    dropped: Counter[str]  # reason -> records dropped at load time
    examples: dict[str, list[str]]  # reason -> up to 3 messages
    num_records: int  # records in the file, dropped ones included


def check_records(
    records: Sequence[Any],
    template: Template | None,
    image_folder: str | Path | None = None,
    on_bad_sample: str = "skip",
) -> CheckedRecords:
    """The load-time checks of a data file: ``parse_records``, then the image folder (``check_image_folder``).

    Raises:
        BadSampleError: a bad record with ``on_bad_sample="error"``.
        UserError: no usable record.
        FileNotFoundError, ValueError: see ``check_image_folder``.
    """
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
    samples, dropped, examples = parse_records(records, template)
    if dropped:
        summary = ", ".join(f"{reason}: {n}" for reason, n in sorted(dropped.items()))
        details = "; ".join(msg for msgs in examples.values() for msg in msgs[:1])
        if on_bad_sample == "error":
            raise BadSampleError(f"bad records ({summary}), e.g. {details}")
        logger.warning("dropped %d of %d records (%s), e.g. %s", sum(dropped.values()), len(records), summary, details)
    if not samples:
        name = f" (template {template.name!r})" if template is not None else ""
        raise UserError(f"no usable record among {len(records)}{name}: {dict(dropped)}")
    check_image_folder(samples, image_folder)
    return CheckedRecords(samples, dropped, examples, len(records))


def check_image_folder(samples: Sequence[Sample], image_folder: str | Path | None) -> None:
    """Refuse an image folder that holds none of a probe of up to 64 of the records' images (a wrong path).

    Raises:
        ValueError: records with images but no ``image_folder``.
        FileNotFoundError: not one probed image exists there (the message names the folder and one path).
    """
    with_image = [s for s in samples if s.image is not None]
    if not with_image:
        return
    if image_folder is None:
        raise ValueError(f"{len(with_image)} records have an 'image' but no image_folder was given")
    folder = Path(image_folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image_folder {str(folder)!r} is not a folder ({len(with_image)} records have images)")
    probe = with_image[:: max(1, len(with_image) // 64)][:64]
    if not any((folder / s.image).is_file() for s in probe):
        raise FileNotFoundError(
            f"none of {len(probe)} probed images exists under image_folder={str(folder)!r} "
            f"(e.g. {str(folder / probe[0].image)!r}); check image_folder, or run python -m llava_stf.data.validate"
        )


class LazySupervisedDataset(Dataset):
    """Training samples as ``{"input_ids": [T], "labels": [T], "pixel_values": [3, H, W] | None, "data_events"}``.

    An AnyRes processor (``LlavaStfNextProcessor``) gives each image its crops, ``pixel_values`` ``[n_crops, 3, H,
    W]``, and its ``image_sizes`` ``[2]`` (height, width); the prompt holds that image's own placeholder count.

    Args:
        records: the data file's records (``load_records``), or the same already checked (``check_records``).
        processor: a ``LlavaStfProcessor`` or ``LlavaStfNextProcessor`` (tokenizer, image mode,
            ``image_inputs``, ``image_token_counts``).
        template: the conversation template (``get_template``).
        image_folder: root of the records' ``image`` paths; required when any record has an image.
        max_length: ``model_max_length``; truncation counts the expanded image tokens.
        on_bad_sample: ``"skip"`` (replace, count, log) or ``"error"`` (raise ``BadSampleError``).
        image_limits: size limits for image files (default ``ImageLimits()``).
        max_consecutive_bad: give up (``BadSampleError``) after this many bad samples in a row.
        image_cache_mb: keep up to this many MiB of processed images in memory (``ImageCache``; 0: none), for
            runs of many epochs over few images.
    """

    def __init__(
        self,
        records: Sequence[Any] | CheckedRecords,
        processor: LlavaStfProcessor,
        template: Template,
        image_folder: str | Path | None = None,
        max_length: int | None = None,
        on_bad_sample: str = "skip",
        image_limits: ImageLimits | None = None,
        max_consecutive_bad: int = 32,
        image_cache_mb: float = 0,
    ):
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        if not isinstance(records, CheckedRecords):
            records = check_records(records, template, image_folder, on_bad_sample)
        self.processor, self.template, self.max_length = processor, template, max_length
        self.on_bad_sample, self.max_consecutive_bad = on_bad_sample, max_consecutive_bad
        self.image_limits = image_limits or ImageLimits()
        self.image_cache = ImageCache(image_cache_mb)
        self.samples = records.samples
        self.dropped_records, self.num_records = records.dropped, records.num_records  # the trainer counts these
        self.image_folder = Path(image_folder) if image_folder is not None else None
        words = [sum(len(t.text.split()) for t in s.turns) for s in self.samples]
        # Length proxies of the sampler (``LazySupervisedDataset.modality_lengths`` in haotian-liu/LLaVA
        # ``llava/train/train.py``): word counts, negative for text-only samples. ``lengths`` adds the image tokens
        # (AnyRes: one crop's count, a lower bound; an image's real count needs its size, known once it is opened).
        self.modality_lengths = [n if s.image is not None else -n for n, s in zip(words, self.samples)]
        image_tokens = [processor.num_image_tokens if s.image is not None else 0 for s in self.samples]
        self.lengths = [n + extra for n, extra in zip(words, image_tokens)]

    def __len__(self) -> int:
        return len(self.samples)

    def build(self, sample: Sample) -> dict[str, Any]:
        """Load one sample's image and tokenize it with that image's placeholder count.

        Raises ``SkippedSample`` for a bad one. The image comes first: its count (``image_token_counts``: fixed for
        LLaVA-1.5, by image size for AnyRes) decides the prompt and the truncation.
        """
        processor = self.processor
        count, image_inputs = processor.num_image_tokens, None
        if sample.image is not None:
            path = self.image_folder / sample.image
            key, cached = self.image_cache.get(path)
            if cached is None:
                image, _ = load_image(path, self.image_limits)
                cached = (
                    processor.image_token_counts([image])[0],
                    {name: value[0] for name, value in processor.image_inputs([image]).items()},
                )
                self.image_cache.put(key, cached)
            count, image_inputs = cached
        tokenized = tokenize_conversation(
            sample.turns,
            self.template,
            processor.tokenizer,
            ImageTokens(processor.image_token_id, count),
            max_length=self.max_length,
        )
        item: dict[str, Any] = {
            "input_ids": torch.tensor(tokenized.input_ids, dtype=torch.long),
            "labels": torch.tensor(tokenized.labels, dtype=torch.long),
            "pixel_values": None,
            "data_events": {"skipped": [], "truncated": int(tokenized.truncated)},
        }
        if image_inputs is not None:  # pixel_values [3, H, W]; AnyRes: [n_crops, 3, H, W] and image_sizes [2]
            item.update(image_inputs)
        return item

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
    "MAX_BAD_SAMPLE_FRACTION",
    "ON_BAD_SAMPLE",
    "RECORD_REASONS",
    "TEMPLATE_MISMATCH",
    "BadSampleError",
    "CheckedRecords",
    "LazySupervisedDataset",
    "MalformedLine",
    "Sample",
    "bad_share",
    "check_image_folder",
    "check_records",
    "load_records",
    "parse_record",
    "parse_records",
    "too_many_bad",
]
