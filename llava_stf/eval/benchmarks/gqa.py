"""GQA testdev-balanced: exact match after ``rstrip('.').lower()`` (haotian-liu/LLaVA ``scripts/v1_5/eval/gqa.sh``).

Questions ``gqa/llava_gqa_testdev_balanced.jsonl``, images ``gqa/data/images/``, answers
``gqa/answers/llava_gqa_testdev_balanced/<ckpt>/merge.jsonl``. Writes ``gqa/data/testdev_balanced_predictions.json`` (as
upstream's ``scripts/convert_gqa_for_eval.py``) for the official GQA ``eval.py`` and scores locally when
``gqa/data/testdev_balanced_questions.json`` is there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..engine import Sample
from ..scoring import gqa_prediction_rows, score_gqa
from .base import Benchmark, Options, Result, jsonl_samples, missing, write_json

TIER = "testdev_balanced"


def _load(folder: Path, split: str, options: Options) -> list[Sample]:
    return jsonl_samples(folder / f"{split}.jsonl", folder / "data" / "images")


def _answers(folder: Path, split: str, model_id: str) -> Path:
    return folder / "answers" / split / model_id / "merge.jsonl"


def _evaluate(
    folder: Path, split: str, records: Sequence[Mapping[str, Any]], model_id: str, options: Options
) -> Result:
    files = [write_json(folder / "data" / f"{TIER}_predictions.json", gqa_prediction_rows(records))]
    gold_file = folder / "data" / f"{TIER}_questions.json"
    if not gold_file.is_file():
        return Result({}, None, files=files, notes=[missing(gold_file, "GQA question file with answers")])
    questions = json.loads(gold_file.read_text(encoding="utf-8"))
    gold = {str(qid): q["answer"] for qid, q in questions.items() if q.get("isBalanced", True)}
    predictions = {str(r["question_id"]): r["text"] for r in records}
    if options.limit:  # a --limit run: the questions asked only
        gold = {qid: answer for qid, answer in gold.items() if qid in predictions}
    accuracy = score_gqa(predictions, gold)
    return Result({"accuracy": accuracy, "questions": len(gold)}, accuracy, "accuracy", files)


GQA = Benchmark(
    name="gqa",
    column="GQA",
    folder="gqa",
    default_split="llava_gqa_testdev_balanced",
    max_new_tokens=128,
    load=_load,
    answers_path=_answers,
    evaluate=_evaluate,
)
