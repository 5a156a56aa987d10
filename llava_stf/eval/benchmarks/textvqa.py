"""TextVQA validation: EvalAI-normalised VQA accuracy, questions with OCR tokens.

Scored as haotian-liu/LLaVA ``llava/eval/eval_textvqa.py`` (with ``llava/eval/m4c_evaluator.py``) does.

Questions ``textvqa/llava_textvqa_val_v051_ocr.jsonl`` (``question_id`` is the image id), images
``textvqa/train_images/``, annotations ``textvqa/TextVQA_0.5.1_val.json``, answers ``textvqa/answers/<ckpt>.jsonl``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..engine import Sample
from ..scoring import score_textvqa
from .base import Benchmark, Options, Result, jsonl_samples, missing


def _load(folder: Path, split: str, options: Options) -> list[Sample]:
    return jsonl_samples(folder / f"{split}.jsonl", folder / "train_images", unique_ids=False)  # id: the image's


def _answers(folder: Path, split: str, model_id: str) -> Path:
    return folder / "answers" / f"{model_id}.jsonl"


def _evaluate(
    folder: Path, split: str, records: Sequence[Mapping[str, Any]], model_id: str, options: Options
) -> Result:
    annotation_file = folder / "TextVQA_0.5.1_val.json"
    if not annotation_file.is_file():
        return Result({}, None, notes=[missing(annotation_file, "TextVQA annotations")])
    annotations = json.loads(annotation_file.read_text(encoding="utf-8"))["data"]
    accuracy = score_textvqa(annotations, records)
    return Result({"accuracy": accuracy, "questions": len(records)}, accuracy, "accuracy")


TEXTVQA = Benchmark(
    name="textvqa",
    column="VQA-T",
    folder="textvqa",
    default_split="llava_textvqa_val_v051_ocr",
    max_new_tokens=128,
    load=_load,
    answers_path=_answers,
    evaluate=_evaluate,
)
