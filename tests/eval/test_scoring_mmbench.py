"""Golden cases for MMBench letter parsing and local CircularEval (CircularEval: MMBench paper, arXiv 2307.06281)."""

import pytest

from llava_stf.eval.scoring import parse_mmbench_letter, score_mmbench

ANIMALS = ["cat", "dog", "bird", "fish"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("B. dog", "B"),
        ("(C)", "C"),
        ("The answer is D.", "D"),
        ("dog", "B"),  # no letter: the option text decides
        ("I'd say a Dog.", "B"),  # lower-case "a" is not a letter token
        ("B or C", None),
        ("cat and dog", None),
        ("E", None),  # only A-D exist
        ("", None),
    ],
)
def test_parse_mmbench_letter(text: str, expected: str | None) -> None:
    assert parse_mmbench_letter(text, ANIMALS) == expected


def _round(qid: int, round_id: int, options: list[str], option_char: str, text: str) -> dict:
    return {
        "question_id": qid,
        "round_id": round_id,
        "options": options,
        "option_char": list(option_char),
        "text": text,
    }


# Question 1 (answer B = dog): every rotation answered right, once by option text.
Q1 = [
    _round(1, 0, ["cat", "dog", "bird", "fish"], "ABCD", "B"),
    _round(1, 1, ["dog", "bird", "fish", "cat"], "BCDA", "A"),
    _round(1, 2, ["bird", "fish", "cat", "dog"], "CDAB", "D"),
    _round(1, 3, ["fish", "cat", "dog", "bird"], "DABC", "dog"),
]
# Question 2 (answer A = red): right in rounds 0 and 1, wrong in round 2 ("A" is blue there), so the group fails.
Q2 = [
    _round(2, 0, ["red", "green", "blue"], "ABC", "A"),
    _round(2, 1, ["green", "blue", "red"], "BCA", "C"),
    _round(2, 2, ["blue", "red", "green"], "CAB", "A"),
]


def test_one_wrong_rotation_fails_the_group() -> None:
    result = score_mmbench(Q1 + Q2, {1: "B", 2: "A"})
    assert result["circular_accuracy"] == pytest.approx(50.0)
    assert result["round0_accuracy"] == pytest.approx(100.0)
    assert (result["questions"], result["incomplete"]) == (2, 0)


def test_single_round_defaults_and_incomplete_count() -> None:
    q3 = [{"question_id": 3, "options": ["x", "y"], "text": "B"}]  # default protocol: no round_id / option_char
    result = score_mmbench(Q1 + Q2 + q3, {1: "B", 2: "A", 3: "B"})
    assert result["circular_accuracy"] == pytest.approx(200 / 3)
    assert result["round0_accuracy"] == pytest.approx(100.0)
    assert result["incomplete"] == 1


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="no answer"):
        score_mmbench(Q1, {2: "A"})
    with pytest.raises(ValueError, match="twice"):
        score_mmbench(Q1 + Q1[:1], {1: "B"})
    with pytest.raises(ValueError, match="no round 0"):
        score_mmbench(Q1[1:], {1: "B"})
