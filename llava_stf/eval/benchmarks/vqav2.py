"""VQAv2 test-dev: scored only by the EvalAI server; this writes its upload file.

Questions ``vqav2/llava_vqav2_mscoco_test-dev2015.jsonl``, full id list ``vqav2/llava_vqav2_mscoco_test2015.jsonl``,
images ``vqav2/test2015/``, answers ``vqav2/answers/<split>/<ckpt>/merge.jsonl``, upload
``vqav2/answers_upload/<split>/<ckpt>.json``: one entry per test2015 question, EvalAI-normalised answers, ``""`` for
questions outside test-dev; a test-dev question without an answer is an error (upstream's
``scripts/convert_vqav2_for_submission.py`` in haotian-liu/LLaVA fills it silently).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..answers import read_jsonl
from ..engine import Sample
from ..scoring import vqav2_submission
from .base import Benchmark, Options, Result, jsonl_samples, missing, write_json

SERVER = "EvalAI VQA challenge 830, test-dev phase"
TEST_LIST = "llava_vqav2_mscoco_test2015.jsonl"


def _load(folder: Path, split: str, options: Options) -> list[Sample]:
    return jsonl_samples(folder / f"{split}.jsonl", folder / "test2015")


def _answers(folder: Path, split: str, model_id: str) -> Path:
    return folder / "answers" / split / model_id / "merge.jsonl"


def _evaluate(
    folder: Path, split: str, records: Sequence[Mapping[str, Any]], model_id: str, options: Options
) -> Result:
    test_file = folder / TEST_LIST
    if not test_file.is_file():
        return Result({}, None, notes=[missing(test_file, "VQAv2 test2015 question list") + " and no upload file"])
    test_ids = [q["question_id"] for q in read_jsonl(test_file)]
    test_dev_ids = [q["question_id"] for q in read_jsonl(folder / f"{split}.jsonl")]
    answers = {r["question_id"]: r["text"] for r in records}
    rows = vqav2_submission(answers, test_ids, required_ids=test_dev_ids)
    upload = write_json(folder / "answers_upload" / split / f"{model_id}.json", rows)
    note = f"upload {upload} to {SERVER}; record its score with --record vqav2=SCORE"
    return Result({"answered": len(answers), "test_questions": len(test_ids)}, None, files=[upload], notes=[note])


VQAV2 = Benchmark(
    name="vqav2",
    column="VQAv2",
    folder="vqav2",
    default_split="llava_vqav2_mscoco_test-dev2015",
    max_new_tokens=128,
    load=_load,
    answers_path=_answers,
    evaluate=_evaluate,
    server=SERVER,
)
