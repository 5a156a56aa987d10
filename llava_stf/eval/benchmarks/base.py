"""The benchmark contract and the helpers the benchmark modules share.

A ``Benchmark`` is a frozen spec: where its questions, images and answers live in LLaVA-1.5's ``playground/data/eval``
layout (haotian-liu/LLaVA ``docs/Evaluation.md`` and ``scripts/v1_5/eval/*.sh``), how many tokens it may generate, and
``evaluate``, which reads the ground truth, calls the pure scorers of ``llava_stf.eval.scoring`` and writes the files
the official tools or servers take. Benchmarks never call the model: ``llava_stf.eval.engine`` does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..answers import read_jsonl
from ..engine import Sample, sample_keys

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
MULTIPLE_CHOICE = "\nAnswer with the option's letter from the given choices directly."
MULTIPLE_CHOICE_CN = "\n请直接回答选项字母。"


@dataclass(frozen=True)
class Options:
    """Per-run choices a benchmark may honour."""

    split: str | None = None  # question-file stem instead of the benchmark's default (e.g. an MMBench test TSV)
    all_rounds: bool = False  # MMBench: ask every circular rotation of the options (local CircularEval)


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
    server: str | None = None  # where the official score comes from when it cannot be computed locally
    notes: Sequence[str] = field(default_factory=tuple)

    def split(self, options: Options) -> str:
        return options.split or self.default_split

    def samples(self, data_root: Path, options: Options = Options()) -> list[Sample]:
        return self.load(data_root / self.folder, self.split(options), options)

    def answers_file(self, data_root: Path, model_id: str, options: Options = Options()) -> Path:
        return self.answers_path(data_root / self.folder, self.split(options), model_id)

    def score(self, data_root: Path, records: Sequence[Mapping[str, Any]], model_id: str, options: Options) -> Result:
        return self.evaluate(data_root / self.folder, self.split(options), records, model_id, options)


def require(path: Path, what: str) -> Path:
    """``path`` if it exists, else a ``FileNotFoundError`` saying what it is and where LLaVA keeps it."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} (expected in LLaVA-1.5's playground/data/eval layout)")
    return path


def jsonl_samples(question_file: Path, image_dir: Path) -> list[Sample]:
    """Samples of a LLaVA question file: ``{"question_id", "image", "text"}`` per line, the suffix already in text.

    The recorded prompt is the text as given (upstream ``model_vqa_loader``).
    """
    questions = read_jsonl(require(question_file, "question file"))
    for number, q in enumerate(questions, 1):
        absent = [k for k in ("question_id", "image", "text") if k not in q]
        if absent:
            raise ValueError(f"{question_file}: question {number} lacks {absent}: {q}")
    keys = sample_keys(str(q["question_id"]) for q in questions)
    return [
        Sample(key, q["question_id"], q["text"], q["text"], image_dir / q["image"]) for key, q in zip(keys, questions)
    ]


def write_json(path: Path, data: Any) -> str:
    """Write JSON atomically (temporary file + rename) and return the path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=None), encoding="utf-8")
    os.replace(tmp, path)
    return str(path)


def missing(path: Path, what: str) -> str:
    return f"{what} not found at {path}; no local score"


__all__ = [
    "MULTIPLE_CHOICE",
    "MULTIPLE_CHOICE_CN",
    "SHORT_ANSWER",
    "Benchmark",
    "Options",
    "Result",
    "jsonl_samples",
    "missing",
    "require",
    "write_json",
]
