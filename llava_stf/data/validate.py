"""Check a LLaVA training set before a long run: ``python -m llava_stf.data.validate --data_path F --image_folder D``.

Runs the checks training runs, with the same code (``load_records``, ``parse_record``, ``check_image_folder``,
``load_image`` and, given a tokenizer, ``tokenize_conversation``), over every record, and prints the problems by kind
with a few examples, what training would fix (image modes converted to RGB) or shorten (truncated conversations),
and whether training would stop on them (``too_many_bad`` at ``--max_bad_sample_fraction``). A malformed JSON-lines
line is a counted ``malformed_record`` here as in training; a file with no record, a ``.json`` file that does not
parse and an image folder that holds none of the images are errors in both (one ``error: ...`` line; ``--debug`` for
the traceback). Exit status: 0 when every record is usable, 1 otherwise.

    python -m llava_stf.data.validate --data_path playground/data/llava_v1_5_mix665k.json \\
        --image_folder playground/data --template vicuna_v1 --processor checkpoints/stage1 --model_max_length 2048
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from llava_stf.errors import add_debug_flag, run_main

from .conversation import TEMPLATES, get_template
from .dataset import (
    MAX_BAD_SAMPLE_FRACTION,
    RECORD_REASONS,
    Sample,
    bad_share,
    check_image_folder,
    load_records,
    parse_records,
    too_many_bad,
)
from .images import ImageLimits, load_image
from .tokenization import ImageTokens, SkippedSample, tokenize_conversation

MAX_EXAMPLES = 3


@dataclass
class ValidationReport:
    """What ``validate_dataset`` found."""

    num_records: int = 0
    problems: Counter = field(default_factory=Counter)  # reason -> number of unusable records
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first messages
    converted: Counter = field(default_factory=Counter)  # source PIL mode -> images converted to RGB (kept)
    truncated: int = 0  # conversations cut to model_max_length (kept)
    max_bad_sample_fraction: float = MAX_BAD_SAMPLE_FRACTION  # training's limit, for ``training_stops``

    @property
    def num_bad(self) -> int:
        return sum(self.problems.values())

    @property
    def num_dropped(self) -> int:
        """Records training drops when it reads the file (the rest of ``num_bad`` it skips when drawn)."""
        return sum(self.problems[reason] for reason in RECORD_REASONS)

    @property
    def training_stops(self) -> bool:
        """Whether training stops on this data: ``too_many_bad`` after one pass over every record."""
        dropped = self.num_dropped
        limit = self.max_bad_sample_fraction
        return too_many_bad(limit, self.num_records, dropped, self.num_records - dropped, self.num_bad - dropped)

    def add(self, reason: str, message: str) -> None:
        self.problems[reason] += 1
        bucket = self.examples.setdefault(reason, [])
        if len(bucket) < MAX_EXAMPLES:
            bucket.append(message)

    def summary(self) -> str:
        lines = [f"{self.num_records} records: {self.num_records - self.num_bad} usable, {self.num_bad} with problems"]
        for reason, n in self.problems.most_common():
            lines.append(f"  {reason:<22} {n:>8}")
            lines += [f"      e.g. {m}" for m in self.examples.get(reason, [])]
        if self.converted:
            modes = ", ".join(f"{mode}: {n}" for mode, n in self.converted.most_common())
            lines.append(f"converted to RGB (kept): {modes}")
        if self.truncated:
            lines.append(f"truncated to model_max_length (kept): {self.truncated}")
        if self.num_bad:
            dropped = self.num_dropped
            share = bad_share(self.num_records, dropped, self.num_records - dropped, self.num_bad - dropped)
            verdict = "stops" if self.training_stops else "skips them and runs"
            lines.append(
                f"training with max_bad_sample_fraction={self.max_bad_sample_fraction:g}: {verdict} "
                f"({self.num_bad} of {self.num_records} records bad, {share:.1%}; {dropped} dropped when the file is "
                f"read, {self.num_bad - dropped} skipped when drawn)"
            )
        return "\n".join(lines)


def validate_dataset(
    data_path: str | Path,
    image_folder: str | Path | None,
    template_name: str | None = None,
    processor=None,
    max_length: int | None = None,
    limits: ImageLimits | None = None,
    num_workers: int = 8,
    max_bad_sample_fraction: float = MAX_BAD_SAMPLE_FRACTION,
) -> ValidationReport:
    """Check every record of ``data_path``; see the module docstring.

    Args:
        data_path: the LLaVA JSON (or JSON lines) file.
        image_folder: root of the records' image paths.
        template_name: also check the records against this template (``plain`` takes exactly two turns).
        processor: a ``LlavaStfProcessor`` (or ``LlavaStfNextProcessor``); when given, conversations are
            tokenized as in training (with ``template_name``, default ``vicuna_v1``; each image's own count).
        max_length: ``model_max_length`` for the truncation check (needs ``processor``).
        limits: image size limits (default ``ImageLimits()``).
        num_workers: threads decoding images.
        max_bad_sample_fraction: training's limit, for the report's verdict (``too_many_bad``).

    Raises:
        FileNotFoundError, UserError, ValueError: what training refuses before it starts (``load_records``,
            ``check_image_folder``).
    """
    records = load_records(data_path)
    template = get_template(template_name) if template_name else None
    report = ValidationReport(num_records=len(records), max_bad_sample_fraction=max_bad_sample_fraction)
    samples, counts, examples = parse_records(records, template)
    report.problems.update(counts)
    report.examples.update(examples)
    check_image_folder(samples, image_folder)

    def check(sample: Sample) -> tuple[Sample, SkippedSample | None, str | None, bool]:
        try:
            image = converted = None
            if sample.image is not None:
                image, converted = load_image(Path(image_folder) / sample.image, limits or ImageLimits())
            truncated = False
            if processor is not None:  # the image's own count, as the dataset writes it (AnyRes: by image size)
                count = processor.image_token_counts([image])[0] if image is not None else processor.num_image_tokens
                spec = ImageTokens(processor.image_token_id, count)
                out = tokenize_conversation(
                    sample.turns, template or get_template("vicuna_v1"), processor.tokenizer, spec, max_length
                )
                truncated = out.truncated
            return sample, None, converted, truncated
        except SkippedSample as err:
            return sample, err, None, False

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        for sample, err, converted, truncated in pool.map(check, samples):
            if err is not None:
                report.add(err.reason, f"id {sample.id!r} (record {sample.index}): {err}")
            else:
                report.truncated += int(truncated)
                if converted:
                    report.converted[converted] += 1
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", required=True, help="LLaVA JSON list (or .jsonl)")
    parser.add_argument("--image_folder", default=None, help="root of the records' 'image' paths")
    parser.add_argument("--template", default=None, choices=sorted(TEMPLATES), help="also check against a template")
    parser.add_argument("--processor", default=None, help="checkpoint with a llava_stf processor: also tokenize "
                        "(with --template, default vicuna_v1)")  # fmt: skip
    parser.add_argument("--model_max_length", type=int, default=None, help="truncation limit (with --processor)")
    parser.add_argument("--max_image_pixels", type=int, default=ImageLimits.max_pixels)
    parser.add_argument("--max_aspect_ratio", type=float, default=ImageLimits.max_aspect_ratio)
    parser.add_argument("--max_image_bytes", type=int, default=ImageLimits.max_bytes)
    parser.add_argument("--max_bad_sample_fraction", type=float, default=MAX_BAD_SAMPLE_FRACTION,
                        help="training's limit: say whether training would stop on this data")  # fmt: skip
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1))
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_main(lambda: _validate(args), debug=args.debug)


def _validate(args: argparse.Namespace) -> int:
    processor = None
    if args.processor:
        from transformers import AutoProcessor

        import llava_stf.model  # noqa: F401  (registers the llava_stf processors with AutoProcessor)

        processor = AutoProcessor.from_pretrained(args.processor)  # 1.5 or AnyRes, as saved
    report = validate_dataset(
        args.data_path,
        args.image_folder,
        args.template,
        processor,
        args.model_max_length,
        ImageLimits(args.max_image_pixels, args.max_aspect_ratio, args.max_image_bytes),
        args.num_workers,
        args.max_bad_sample_fraction,
    )
    print(report.summary())
    return 1 if report.num_bad else 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ValidationReport", "main", "validate_dataset"]
