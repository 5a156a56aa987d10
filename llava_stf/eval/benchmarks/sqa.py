"""ScienceQA-IMG: option letter parsing, headline IMG-Accuracy (haotian-liu/LLaVA ``llava/eval/eval_science_qa.py``).

Questions ``scienceqa/llava_test_CQM-A.json`` (a LLaVA-format list; problems without ``image`` are text-only),
images ``scienceqa/images/test/``, ground truth ``scienceqa/problems.json`` + ``scienceqa/pid_splits.json``, answers
``scienceqa/answers/<ckpt>.jsonl``; metrics also go to ``scienceqa/answers/<ckpt>_result.json``. Images are converted
to RGB (upstream's ``llava/eval/model_vqa_science.py`` does not).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...data.conversation import IMAGE_TOKEN
from ..engine import Sample, sample_keys
from ..scoring import score_sqa
from .base import (
    MULTIPLE_CHOICE,
    Benchmark,
    Options,
    QuestionFileError,
    Result,
    missing,
    problem_list,
    repeated_ids,
    require,
    write_json,
)


def _questions(folder: Path, split: str) -> Path:
    return folder / f"{split}.json"


def _load(folder: Path, split: str, options: Options) -> list[Sample]:
    path = require(_questions(folder, split), "question file")
    try:
        problems = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QuestionFileError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(problems, list):
        raise QuestionFileError(f"{path}: expected a JSON list of problems")
    errors, seen = [], {}
    for number, problem in enumerate(problems):
        if not isinstance(problem, dict) or "id" not in problem or not problem.get("conversations"):
            errors.append(f"problem {number} lacks 'id' or 'conversations'")
        else:
            seen.setdefault(str(problem["id"]), []).append((number, problem["id"]))
    errors += repeated_ids(seen, "id", "problems")
    if errors:
        raise QuestionFileError(problem_list(path, errors))
    samples = []
    for key, problem in zip(sample_keys(str(p["id"]) for p in problems), problems):
        question = problem["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip() + MULTIPLE_CHOICE
        image = folder / "images" / "test" / problem["image"] if problem.get("image") else None
        prompt = f"{IMAGE_TOKEN}\n{question}" if image is not None else question
        samples.append(Sample(key, problem["id"], question, prompt, image))
    return samples


def _answers(folder: Path, split: str, model_id: str) -> Path:
    return folder / "answers" / f"{model_id}.jsonl"


def _evaluate(
    folder: Path, split: str, records: Sequence[Mapping[str, Any]], model_id: str, options: Options
) -> Result:
    problem_file, split_file = folder / "problems.json", folder / "pid_splits.json"
    for path in (problem_file, split_file):
        if not path.is_file():
            return Result({}, None, notes=[missing(path, "ScienceQA ground truth")])
    problems = json.loads(problem_file.read_text(encoding="utf-8"))
    test_ids = json.loads(split_file.read_text(encoding="utf-8"))["test"]
    predictions = {str(r["question_id"]): {"text": r["text"], "prompt": r["prompt"]} for r in records}
    if options.limit:  # a --limit run: the questions asked only
        test_ids = [pid for pid in test_ids if str(pid) in predictions]
    metrics = score_sqa({pid: problems[pid] for pid in test_ids}, predictions)
    files = [write_json(folder / "answers" / f"{model_id}_result.json", metrics)]
    return Result(metrics, metrics["img_accuracy"], "img_accuracy", files)


SQA = Benchmark(
    name="sqa",
    column="SQA",
    folder="scienceqa",
    default_split="llava_test_CQM-A",
    max_new_tokens=1024,
    load=_load,
    answers_path=_answers,
    evaluate=_evaluate,
    question_path=_questions,
)
