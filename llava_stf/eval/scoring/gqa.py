"""GQA testdev-balanced scoring: the prediction is the answer text with trailing periods stripped and lower-cased
(haotian-liu/LLaVA ``scripts/convert_gqa_for_eval.py``), and accuracy is exact string equality with the gold answer,
as in the official GQA ``eval.py`` restricted to accuracy (the other metrics need files the v1.2 release lacks).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def gqa_prediction(text: str) -> str:
    """The GQA prediction string for one answer: ``text.rstrip('.').lower()``, nothing else.

    Args:
        text: The model's (already whitespace-stripped) answer.

    Returns:
        The prediction compared with the gold answer.
    """
    return text.rstrip(".").lower()


def gqa_prediction_rows(answers: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``testdev_balanced_predictions.json`` that the official GQA ``eval.py`` reads.

    Args:
        answers: Answer records with ``question_id`` and ``text``, in answer-file order.

    Returns:
        ``[{"questionId": question_id, "prediction": gqa_prediction(text)}, ...]`` in the same order.
    """
    return [{"questionId": a["question_id"], "prediction": gqa_prediction(a["text"])} for a in answers]


def score_gqa(predictions: Mapping[Any, str], gold_answers: Mapping[Any, str]) -> float:
    """GQA accuracy: exact match of ``gqa_prediction(text)`` with the gold answer, over the gold questions.

    Args:
        predictions: ``{question_id: raw answer text}``. Ids not in ``gold_answers`` are ignored, as upstream.
        gold_answers: ``{question_id: gold answer}`` for the balanced questions of the tier being scored.

    Returns:
        The accuracy in percent.

    Raises:
        ValueError: If ``gold_answers`` is empty or some gold question has no prediction (upstream raises a
            ``KeyError`` there as well).
    """
    if not gold_answers:
        raise ValueError("score_gqa got no gold answers")
    missing = [qid for qid in gold_answers if qid not in predictions]
    if missing:
        raise ValueError(f"GQA: {len(missing)} of {len(gold_answers)} questions have no prediction, e.g. {missing[:3]}")
    correct = sum(gqa_prediction(predictions[qid]) == gold for qid, gold in gold_answers.items())
    return 100.0 * correct / len(gold_answers)
