"""The benchmark contract and the helpers the benchmark modules share.

A ``Benchmark`` is a frozen spec: where its questions, images and answers live in LLaVA-1.5's ``playground/data/eval``
layout (haotian-liu/LLaVA ``docs/Evaluation.md`` and ``scripts/v1_5/eval/*.sh``), how many tokens it may generate, and
``evaluate``, which reads the ground truth, calls the pure scorers of ``llava_stf.eval.scoring`` and writes the files
the official tools or servers take. Benchmarks never call the model: ``llava_stf.eval.engine`` does. ``<ckpt>`` in
the benchmark modules' paths is the model id (folder name + digest, or ``--model-id``).

Loading checks the whole question file before any model loads and reports every problem in one error
(``QuestionFileError``): lines that are not JSON objects, missing fields and, for benchmarks whose scorers join
answers on the question id, repeated ids (``7`` and ``"7"`` count as the same id).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import UserError
from ..answers import write_text_atomic
from ..engine import Sample, sample_keys

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
MULTIPLE_CHOICE = "\nAnswer with the option's letter from the given choices directly."
MULTIPLE_CHOICE_CN = "\n请直接回答选项字母。"
QUESTION_FIELDS = ("question_id", "image", "text")  # a LLaVA question line (upstream model_vqa_loader)
MAX_PROBLEMS = 20  # problems listed in one question-file error


class QuestionFileError(UserError):
    """A question or ground-truth file has malformed lines, missing fields or repeated ids (all listed)."""


@dataclass(frozen=True)
class Options:
    """Per-run choices a benchmark may honour."""

    split: str | None = None  # question-file stem instead of the benchmark's default (e.g. an MMBench test TSV)
    all_rounds: bool = False  # MMBench: ask every circular rotation of the options (local CircularEval)
    questions: Path | None = None  # a question file of the user's own (benchmarks with ``takes_files`` only)
    image_folder: Path | None = None  # where its images are (default: the question file's folder)
    ground_truth: Path | None = None  # its answers: ``{"question_id", "answer", "category"?}`` lines (optional)
    limit: int | None = None  # --limit N: only the first N questions were asked; scorers then score those alone


@dataclass(frozen=True)
class Result:
    """What ``evaluate`` found and wrote."""

    metrics: Mapping[str, Any]  # scorer output (percent unless the benchmark says otherwise)
    headline: float | None  # the number the paper's table reports; None when it needs a server or missing files
    headline_metric: str | None = None  # which entry of ``metrics`` the headline is
    files: Sequence[str] = ()  # submission / converted files written
    notes: Sequence[str] = ()  # what could not be done and why (missing ground truth, server-only split)


@dataclass(frozen=True)
class Benchmark:
    """One benchmark, declared."""

    name: str  # registry key and ``--benchmark`` value
    column: str  # column of the paper's results table
    folder: str  # sub-folder of the eval data root (upstream name, e.g. "MME", "scienceqa")
    default_split: str  # question-file stem
    max_new_tokens: int  # 128 for short answers, 1024 for ScienceQA and MMBench (upstream scripts)
    load: Callable[[Path, str, Options], list[Sample]]  # (benchmark folder, split, options) -> samples
    answers_path: Callable[[Path, str, str], Path]  # (benchmark folder, split, model id) -> final answers file
    evaluate: Callable[[Path, str, Sequence[Mapping[str, Any]], str, Options], Result]  # (folder, split, ...)
    question_path: Callable[[Path, str], Path] = lambda folder, split: folder / f"{split}.jsonl"  # what it loads
    server: str | None = None  # where the official score comes from when it cannot be computed locally
    notes: Sequence[str] = field(default_factory=tuple)
    takes_files: bool = False  # honours Options.questions / image_folder / ground_truth (the generic VQA benchmark)

    def split(self, options: Options) -> str:
        return options.questions.stem if self.takes_files and options.questions else options.split or self.default_split

    def folder_path(self, data_root: Path, options: Options) -> Path:
        """Its folder: under the data root, or the folder of a question file named in ``options``."""
        return options.questions.parent if self.takes_files and options.questions else data_root / self.folder

    def question_file(self, data_root: Path, options: Options = Options()) -> Path:
        """The file its questions come from (what the answers' provenance records a digest of)."""
        if self.takes_files and options.questions:
            return options.questions
        return self.question_path(self.folder_path(data_root, options), self.split(options))

    def samples(self, data_root: Path, options: Options = Options()) -> list[Sample]:
        return self.load(self.folder_path(data_root, options), self.split(options), options)

    def answers_file(self, data_root: Path, model_id: str, options: Options = Options()) -> Path:
        return self.answers_path(self.folder_path(data_root, options), self.split(options), model_id)

    def score(self, data_root: Path, records: Sequence[Mapping[str, Any]], model_id: str, options: Options) -> Result:
        return self.evaluate(self.folder_path(data_root, options), self.split(options), records, model_id, options)

    def results_key(self, options: Options) -> str:
        """Its key in ``results.json``: benchmark and split (for a file of one's own: its full path), so two splits
        or two question files never overwrite each other."""
        if self.takes_files and options.questions:
            return f"{self.name}/{options.questions.resolve()}"
        return f"{self.name}/{self.split(options)}"

    def table_column(self, options: Options) -> str:
        """Its results-table column: the paper's for the default split, ``"<column> (<split>)"`` for another,
        ``"<column> (<folder>/<stem>)"`` for a question file of one's own."""
        if self.takes_files and options.questions:
            return f"{self.column} ({options.questions.parent.name}/{options.questions.stem})"
        split = self.split(options)
        return self.column if split == self.default_split else f"{self.column} ({split})"


def require(path: Path, what: str) -> Path:
    """``path`` if it exists, else a ``FileNotFoundError`` saying what it is and where LLaVA keeps it."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} (expected in LLaVA-1.5's playground/data/eval layout)")
    return path


def read_records(
    path: Path, required: Sequence[str], id_field: str | None = "question_id", what: str = "question file"
) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, checked as a whole: one error lists every problem.

    Args:
        path: The file.
        required: Fields every line must have.
        id_field: A field whose values must be unique (compared as strings, so ``7`` and ``"7"`` clash); None: any.
        what: What the file is, for messages.

    Raises:
        FileNotFoundError: If there is no such file.
        QuestionFileError: Listing lines that are not JSON objects, lack fields, or repeat an id.
    """
    problems, records, seen = [], [], {}
    lines = require(path, what).read_bytes().split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            problems.append(f"line {number}: not a JSON line ({err})")
            continue
        if not isinstance(record, dict):
            problems.append(f"line {number}: not a JSON object")
            continue
        absent = [k for k in required if record.get(k) is None]
        if absent:
            problems.append(f"line {number}: lacks {', '.join(map(repr, absent))}")
        if id_field and record.get(id_field) is not None:
            seen.setdefault(str(record[id_field]), []).append((number, record[id_field]))
        records.append(record)
    problems += repeated_ids(seen, id_field or "")
    if problems:
        raise QuestionFileError(problem_list(path, problems))
    return records


def repeated_ids(seen: Mapping[str, Sequence[tuple[Any, Any]]], field_name: str, where: str = "lines") -> list[str]:
    """A problem per id seen more than once: ``{str(id): [(line or row, raw id), ...]}``."""
    return [
        f"{field_name} {' and '.join(dict.fromkeys(repr(raw) for _, raw in uses))} repeated on {where} "
        f"{', '.join(str(n) for n, _ in uses)}"
        for uses in seen.values()
        if len(uses) > 1
    ]


def problem_list(path: Path, problems: Sequence[str]) -> str:
    """One message listing (at most ``MAX_PROBLEMS``) problems of ``path``."""
    more = f"; ... and {len(problems) - MAX_PROBLEMS} more" if len(problems) > MAX_PROBLEMS else ""
    return f"{path}: {len(problems)} problem(s): {'; '.join(problems[:MAX_PROBLEMS])}{more}"


def jsonl_samples(
    question_file: Path,
    image_dir: Path,
    unique_ids: bool = True,
    required: Sequence[str] = QUESTION_FIELDS,
) -> list[Sample]:
    """Samples of a LLaVA question file: ``{"question_id", "image", "text"}`` per line, the suffix already in text.

    The recorded prompt is the text as given (upstream ``model_vqa_loader``). ``unique_ids=False`` for benchmarks
    whose questions share ids on purpose (TextVQA and MME: the image's id); they are told apart by occurrence.
    """
    questions = read_records(question_file, required, "question_id" if unique_ids else None)
    if not questions:
        raise QuestionFileError(f"{question_file}: no questions")
    keys = sample_keys(str(q["question_id"]) for q in questions)
    return [
        Sample(key, q["question_id"], q["text"], q["text"], image_dir / q["image"]) for key, q in zip(keys, questions)
    ]


def write_json(path: Path, data: Any) -> str:
    """Write JSON atomically (temporary file + rename) and return the path as a string."""
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=None))
    return str(path)


def missing(path: Path, what: str) -> str:
    return f"{what} not found at {path}; no local score"


__all__ = [
    "MULTIPLE_CHOICE",
    "MULTIPLE_CHOICE_CN",
    "QUESTION_FIELDS",
    "SHORT_ANSWER",
    "Benchmark",
    "Options",
    "QuestionFileError",
    "Result",
    "jsonl_samples",
    "missing",
    "problem_list",
    "read_records",
    "repeated_ids",
    "require",
    "write_json",
]
