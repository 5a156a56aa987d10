"""VizWiz test: scored only by the EvalAI server; this writes its upload file.

Questions ``vizwiz/llava_test.jsonl``, images ``vizwiz/test/``, answers ``vizwiz/answers/<ckpt>.jsonl``, upload
``vizwiz/answers_upload/<ckpt>.json``: ``{"image", "answer"}`` per question with EvalAI-normalised answers, as
haotian-liu/LLaVA ``scripts/convert_vizwiz_for_submission.py`` writes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..answers import read_jsonl
from ..engine import Sample
from ..scoring import vizwiz_submission
from .base import Benchmark, Options, Result, jsonl_samples, require, write_json

SERVER = "EvalAI VizWiz VQA challenge (LLaVA-1.5 used challenge 1911)"


def _load(folder: Path, split: str, options: Options) -> list[Sample]:
    return jsonl_samples(folder / f"{split}.jsonl", folder / "test")


def _answers(folder: Path, split: str, model_id: str) -> Path:
    return folder / "answers" / f"{model_id}.jsonl"


def _evaluate(
    folder: Path, split: str, records: Sequence[Mapping[str, Any]], model_id: str, options: Options
) -> Result:
    questions = read_jsonl(require(folder / f"{split}.jsonl", "question file"))
    rows = vizwiz_submission(questions, {r["question_id"]: r["text"] for r in records})
    upload = write_json(folder / "answers_upload" / f"{model_id}.json", rows)
    note = f"upload {upload} to {SERVER}; record its score with --record vizwiz=SCORE"
    return Result({"answered": len(rows)}, None, files=[upload], notes=[note])


VIZWIZ = Benchmark(
    name="vizwiz",
    column="VizWiz",
    folder="vizwiz",
    default_split="llava_test",
    max_new_tokens=128,
    load=_load,
    answers_path=_answers,
    evaluate=_evaluate,
    server=SERVER,
)
