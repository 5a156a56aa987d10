"""Exact match after LLaVA's VQA answer normalisation, overall and per category: the score of the generic ``vqa``
benchmark (any LLaVA question file) and of the demo's ``synthetic`` world. Pure: no files, no model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .vqa import normalize_vqa_answer


def score_exact_match(
    predictions: Mapping[str, str], answers: Mapping[str, str], categories: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Exact-match accuracy (percent) after VQA normalisation, overall and per category; pure (no files).

    Args:
        predictions: ``{question_id: model text}``.
        answers: ``{question_id: ground-truth answer}``; must hold every predicted id.
        categories: ``{question_id: category}``; ids without one are counted overall only.

    Raises:
        KeyError: If a predicted question has no answer.
        ValueError: If there are no predictions.
    """
    absent = [qid for qid in predictions if qid not in answers]
    if absent:
        raise KeyError(f"{len(absent)} predicted question(s) have no ground truth, e.g. {absent[:3]}")
    if not predictions:
        raise ValueError("no predictions to score")
    hits = {qid: normalize_vqa_answer(text) == normalize_vqa_answer(answers[qid]) for qid, text in predictions.items()}
    metrics: dict[str, Any] = {"accuracy": 100.0 * sum(hits.values()) / len(hits), "questions": len(hits)}
    by_category: dict[str, list[bool]] = {}
    for qid, right in hits.items():
        if (categories or {}).get(qid) is not None:
            by_category.setdefault(str(categories[qid]), []).append(right)
    for category in sorted(by_category):
        metrics[f"accuracy_{category}"] = 100.0 * sum(by_category[category]) / len(by_category[category])
        metrics[f"questions_{category}"] = len(by_category[category])
    return metrics


__all__ = ["score_exact_match"]
