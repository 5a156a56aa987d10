"""Golden cases for POPE yes/no mapping and metrics, paired by question id.

Rules: haotian-liu/LLaVA ``llava/eval/eval_pope.py`` (which pairs by file position instead).
"""

import pytest

from llava_stf.eval.scoring import pope_metrics, pope_yes_no, score_pope


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No, there is not.", "no"),
        ("Yes, there is a dog in the image.", "yes"),
        ("There is no dog.", "no"),
        ("there is not a cat", "no"),
        ("no.", "no"),
        # only the first sentence counts
        ("Yes. No dog is there", "yes"),
        # word match is exact and case-sensitive except for "No"
        ("NO", "yes"),
        ("Not at all", "yes"),
        ("Nope", "yes"),
        ("No,there", "yes"),  # the comma is deleted, leaving one word "Nothere"
        ("", "yes"),
        ("I cannot tell", "yes"),
    ],
)
def test_pope_yes_no(text: str, expected: str) -> None:
    assert pope_yes_no(text) == expected


LABELS = {1: "yes", 2: "yes", 3: "yes", 4: "no", 5: "no", 6: "no"}
PREDICTIONS = {1: "Yes, there is.", 2: "Yes", 3: "No, there is not.", 4: "There is a dog.", 5: "no", 6: "NO"}


def test_pope_metrics_by_hand() -> None:
    # yes, yes, no, yes, no, yes against yes, yes, yes, no, no, no: TP 2, FN 1, FP 2, TN 1.
    m = pope_metrics(PREDICTIONS, LABELS)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 2, 1, 1)
    assert m["accuracy"] == pytest.approx(50.0)
    assert m["precision"] == pytest.approx(50.0)
    assert m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(400 / 7)  # 2 * 1/2 * 2/3 / (1/2 + 2/3) = 4/7
    assert m["yes_ratio"] == pytest.approx(200 / 3)


def test_pairs_by_question_id_not_order() -> None:
    # Upstream would zip these by position (No vs yes, Yes vs no) and score 0.
    assert pope_metrics({2: "No", 1: "Yes"}, {1: "yes", 2: "no"})["accuracy"] == pytest.approx(100.0)


def test_undefined_precision_is_zero() -> None:
    m = pope_metrics({1: "no", 2: "no"}, {1: "yes", 2: "no"})
    assert (m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)
    assert m["accuracy"] == pytest.approx(50.0)


def test_score_pope_mean_f1() -> None:
    predictions = {
        "adversarial": PREDICTIONS,
        "popular": {1: "Yes", 2: "No"},
        "random": {1: "no", 2: "no"},
    }
    labels = {"adversarial": LABELS, "popular": {1: "yes", 2: "no"}, "random": {1: "yes", 2: "no"}}
    result = score_pope(predictions, labels)
    assert result["splits"]["popular"]["f1"] == pytest.approx(100.0)
    assert result["mean_f1"] == pytest.approx((400 / 7 + 100.0 + 0.0) / 3)


def test_mismatches_fail_loudly() -> None:
    with pytest.raises(ValueError, match="predictions: 1, labels: 2"):
        pope_metrics({1: "yes"}, {1: "yes", 2: "no"})
    with pytest.raises(ValueError, match="yes' or 'no"):
        pope_metrics({1: "yes"}, {1: "Yes"})
    with pytest.raises(ValueError, match="splits differ"):
        score_pope({"random": {1: "yes"}}, {"random": {1: "yes"}, "popular": {1: "yes"}})
