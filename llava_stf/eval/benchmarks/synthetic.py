"""The generated visual-QA world (``llava_stf.data.synthetic``): exact match after VQA normalisation, per family.

Layout under the data root (what ``python -m llava_stf.data.synthetic --out <root>/synthetic`` writes): questions
``synthetic/eval/questions.jsonl`` (``category`` = question family), images ``synthetic/images/`` (the question's
``image`` is relative to ``synthetic/``), ground truth ``synthetic/eval/answers.jsonl``, model answers
``synthetic/eval/model_answers/<ckpt>.jsonl`` (another split, e.g. the blank-image control ``questions_blank``:
``model_answers/<split>/<ckpt>.jsonl``, so the two never resume each other's answers). A prediction is right when it
equals the answer after the EvalAI normalisation LLaVA uses for VQA (lower case, punctuation, number words as
digits, no articles); the headline is the mean over all questions, and every family gets its own accuracy. Answers
are one or two words, so generation stops after 16 tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..answers import read_jsonl
from ..engine import Sample
from ..scoring import normalize_vqa_answer
from .base import Benchmark, Options, Result, jsonl_samples, require


def score_synthetic(
    predictions: Mapping[str, str], answers: Mapping[str, str], families: Mapping[str, str]
) -> dict[str, Any]:
    """Exact-match accuracy (percent) overall and per family; pure (no files).

    Args:
        predictions: ``{question_id: model text}``.
        answers: ``{question_id: ground-truth answer}``; must hold every predicted id.
        families: ``{question_id: question family}`` for the same ids.

    Raises:
        KeyError: If a predicted question has no answer or no family.
    """
    absent = [qid for qid in predictions if qid not in answers or qid not in families]
    if absent:
        raise KeyError(f"{len(absent)} predicted question(s) have no ground truth, e.g. {absent[:3]}")
    if not predictions:
        raise ValueError("no predictions to score")
    hits: dict[str, list[bool]] = {}
    for qid, text in predictions.items():
        right = normalize_vqa_answer(text) == normalize_vqa_answer(answers[qid])
        hits.setdefault(families[qid], []).append(right)
    every = [h for family in hits.values() for h in family]
    metrics: dict[str, Any] = {"accuracy": 100.0 * sum(every) / len(every), "questions": len(every)}
    for family in sorted(hits):
        metrics[f"accuracy_{family}"] = 100.0 * sum(hits[family]) / len(hits[family])
        metrics[f"questions_{family}"] = len(hits[family])
    return metrics


def _load(folder: Path, split: str, options: Options) -> list[Sample]:
    return jsonl_samples(folder / "eval" / f"{split}.jsonl", folder)


def _answers(folder: Path, split: str, model_id: str) -> Path:
    answers = folder / "eval" / "model_answers"
    return answers / f"{model_id}.jsonl" if split == "questions" else answers / split / f"{model_id}.jsonl"


def _evaluate(
    folder: Path, split: str, records: Sequence[Mapping[str, Any]], model_id: str, options: Options
) -> Result:
    truth = read_jsonl(require(folder / "eval" / f"{split.replace('questions', 'answers')}.jsonl", "answer file"))
    answers = {str(a["question_id"]): a["answer"] for a in truth}
    families = {str(a["question_id"]): a["family"] for a in truth}
    metrics = score_synthetic({str(r["question_id"]): r["text"] for r in records}, answers, families)
    return Result(metrics, metrics["accuracy"], "accuracy")


SYNTHETIC = Benchmark(
    name="synthetic",
    column="Synth",
    folder="synthetic",
    default_split="questions",
    max_new_tokens=16,
    load=_load,
    answers_path=_answers,
    evaluate=_evaluate,
)
