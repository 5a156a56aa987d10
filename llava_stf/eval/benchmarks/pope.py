"""POPE on COCO val2014: per-split accuracy / precision / recall / F1, headline mean F1.

Questions ``pope/llava_pope_test.jsonl`` (with ``category``), images ``pope/val2014/``, labels
``pope/coco/coco_pope_{adversarial,popular,random}.json``, answers ``pope/answers/<ckpt>.jsonl``. Upstream
(haotian-liu/LLaVA ``llava/eval/eval_pope.py``) pairs answers with label lines by position; here each label line is
joined to its question on (image, question text without the suffix), and a question without exactly one label is an
error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..answers import read_jsonl
from ..engine import Sample
from ..scoring import score_pope
from .base import QUESTION_FIELDS, Benchmark, Options, Result, jsonl_samples, missing, require


def _load(folder: Path, split: str, options: Options) -> list[Sample]:
    return jsonl_samples(folder / f"{split}.jsonl", folder / "val2014", required=(*QUESTION_FIELDS, "category"))


def _answers(folder: Path, split: str, model_id: str) -> Path:
    return folder / "answers" / f"{model_id}.jsonl"


def _question(text: str) -> str:
    return text.split("\n")[0].strip()


def _labels(label_file: Path, questions: Sequence[Mapping[str, Any]]) -> dict[Any, str]:
    """``{question_id: label}`` for one split, joined on (image, question)."""
    by_key: dict[tuple[str, str], list[str]] = {}
    for line in read_jsonl(label_file):
        by_key.setdefault((line["image"], _question(line["text"])), []).append(line["label"])
    labels, bad = {}, []
    for q in questions:
        found = by_key.get((q["image"], _question(q["text"])), [])
        if len(found) != 1:
            bad.append(q["question_id"])
        else:
            labels[q["question_id"]] = found[0]
    if bad:
        raise ValueError(f"{label_file}: {len(bad)} question(s) match no label or several, e.g. {bad[:3]}")
    return labels


def _evaluate(
    folder: Path, split: str, records: Sequence[Mapping[str, Any]], model_id: str, options: Options
) -> Result:
    questions = read_jsonl(require(folder / f"{split}.jsonl", "question file"))
    by_split: dict[str, list[Mapping[str, Any]]] = {}
    for q in questions:
        by_split.setdefault(q["category"], []).append(q)
    answers = {r["question_id"]: r["text"] for r in records}
    if options.limit:  # a --limit run: the questions asked only (and the splits they belong to)
        asked = {name: [q for q in qs if q["question_id"] in answers] for name, qs in by_split.items()}
        by_split = {name: qs for name, qs in asked.items() if qs}
    predictions, labels = {}, {}
    for name, split_questions in sorted(by_split.items()):
        label_file = folder / "coco" / f"coco_pope_{name}.json"
        if not label_file.is_file():
            return Result({}, None, notes=[missing(label_file, f"POPE {name} labels")])
        labels[name] = _labels(label_file, split_questions)
        predictions[name] = {q["question_id"]: answers[q["question_id"]] for q in split_questions}
    metrics = score_pope(predictions, labels)
    return Result(metrics, metrics["mean_f1"], "mean_f1")


POPE = Benchmark(
    name="pope",
    column="POPE",
    folder="pope",
    default_split="llava_pope_test",
    max_new_tokens=128,
    load=_load,
    answers_path=_answers,
    evaluate=_evaluate,
)
