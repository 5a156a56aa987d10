"""Golden cases for GQA scoring: trailing periods stripped, lower-cased, exact match.

Rules: haotian-liu/LLaVA ``scripts/convert_gqa_for_eval.py`` and the official GQA ``eval.py`` (accuracy only).
"""

import pytest

from llava_stf.eval.scoring import gqa_prediction, gqa_prediction_rows, score_gqa


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Yes.", "yes"), ("left...", "left"), ("3.5", "3.5"), ("Yes .", "yes "), ("No, it is not.", "no, it is not")],
)
def test_gqa_prediction(text: str, expected: str) -> None:
    assert gqa_prediction(text) == expected


def test_score_gqa_exact_match() -> None:
    predictions = {"1": "Yes.", "2": "left...", "3": "No, it is not.", "4": "3.5", "extra": "ignored"}
    gold = {"1": "yes", "2": "left", "3": "no", "4": "3.5"}
    assert score_gqa(predictions, gold) == pytest.approx(75.0)


def test_missing_prediction_raises() -> None:
    with pytest.raises(ValueError, match="1 of 2"):
        score_gqa({"1": "yes"}, {"1": "yes", "2": "no"})


def test_prediction_rows() -> None:
    rows = gqa_prediction_rows([{"question_id": "20", "text": "Table."}, {"question_id": "7", "text": "no"}])
    assert rows == [{"questionId": "20", "prediction": "table"}, {"questionId": "7", "prediction": "no"}]
