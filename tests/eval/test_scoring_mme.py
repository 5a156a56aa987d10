"""Golden cases for MME parsing, acc / acc+ and the Perception / Cognition totals (MME eval_tool calculation.py)."""

import pytest

from llava_stf.eval.scoring import (
    MME_COGNITION_TASKS,
    MME_PERCEPTION_TASKS,
    mme_task_metrics,
    parse_mme_answer,
    score_mme,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("YES.", "yes"),
        ("yes, there is", "yes"),
        ("yes no", "yes"),
        ("No, yes", "no"),
        ("Nope", "no"),
        ("Not sure", "no"),
        ("none", "no"),
        ("know", "no"),  # "know"[:4] contains "no"
        ("The answer is yes", "other"),  # only the first 4 characters are looked at
        ("There is no", "other"),
        ("unknown", "other"),
        ("y", "other"),
        ("", "other"),
    ],
)
def test_parse_mme_answer(text: str, expected: str) -> None:
    assert parse_mme_answer(text) == expected


def _rec(image: str, gt: str, pred: str, category: str = "existence") -> dict[str, str]:
    return {"category": category, "image": image, "question": "Q? Please answer yes or no.", "ground_truth": gt,
            "prediction": pred}  # fmt: skip


def test_acc_and_acc_plus() -> None:
    records = [_rec("1.jpg", "Yes", "Yes"), _rec("1.jpg", "No", "No"), _rec("2.jpg", "Yes", "yes"),
               _rec("2.jpg", "No", "Maybe")]  # fmt: skip
    m = mme_task_metrics(records)
    # acc 3/4, acc+ 1/2 (only image 1 has both right), score (0.75 + 0.5) * 100
    assert m["acc"] == pytest.approx(0.75)
    assert m["acc_plus"] == pytest.approx(0.5)
    assert m["score"] == pytest.approx(125.0)
    assert m["other"] == 1


def test_pairs_by_image_not_by_line() -> None:
    # Image 1 both right, image 2 both wrong, lines interleaved: by image acc+ = 1/2 (score 100); pairing consecutive
    # lines would give acc+ = 0 (score 50).
    records = [_rec("1.jpg", "Yes", "Yes"), _rec("2.jpg", "Yes", "No"), _rec("1.jpg", "No", "No"),
               _rec("2.jpg", "No", "Yes")]  # fmt: skip
    assert mme_task_metrics(records)["score"] == pytest.approx(100.0)


def test_each_image_needs_two_questions() -> None:
    with pytest.raises(ValueError, match="exactly 2"):
        mme_task_metrics([_rec("1.jpg", "Yes", "Yes"), _rec("1.jpg", "No", "No"), _rec("1.jpg", "No", "No")])
    with pytest.raises(ValueError, match="yes or no"):
        mme_task_metrics([_rec("1.jpg", "Maybe", "Yes"), _rec("1.jpg", "No", "No")])


def _perfect(task: str) -> list[dict[str, str]]:
    return [_rec("a.jpg", "Yes", "Yes", task), _rec("a.jpg", "No", "No", task)]


def test_perception_and_cognition_totals() -> None:
    records = [r for task in MME_PERCEPTION_TASKS for r in _perfect(task)]
    result = score_mme(records)
    assert result["perception"] == pytest.approx(2000.0)
    assert result["cognition"] is None  # no cognition task present
    # One wrong answer in "count": acc 1/2, acc+ 0 -> 50 instead of 200.
    records[2:4] = [_rec("a.jpg", "Yes", "Yes", "count"), _rec("a.jpg", "No", "Yes", "count")]
    result = score_mme(records + [r for task in MME_COGNITION_TASKS for r in _perfect(task)])
    assert result["tasks"]["count"]["score"] == pytest.approx(50.0)
    assert result["perception"] == pytest.approx(1850.0)
    assert result["cognition"] == pytest.approx(800.0)
    assert score_mme(records[2:])["perception"] is None  # "existence" missing


def test_unknown_category_raises() -> None:
    with pytest.raises(ValueError, match="unknown MME category"):
        score_mme([_rec("a.jpg", "Yes", "Yes", "counting")])
