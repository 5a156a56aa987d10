"""Golden cases for ScienceQA answer parsing and (IMG-)accuracy (haotian-liu/LLaVA llava/eval/eval_science_qa.py)."""

import pytest

from llava_stf.eval.scoring import parse_sqa_answer, score_sqa, sqa_choice_index


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("B. The sun", "B"),
        ("E. x", "E"),
        ("The answer is B.", "B"),
        # the unescaped final "." needs some character after the letter, any character
        ("The answer is B, because", "B"),
        ("The answer is B", "FAILED"),
        # exactly one match is required; the pattern is case-sensitive
        ("The answer is A. The answer is C.", "FAILED"),
        ("The answer is A. No, the answer is C.", "A"),
        ("The answer is (B).", "FAILED"),
        ("The answer is F.", "F"),
        ("b", "FAILED"),
        ("A.", "FAILED"),
        ("AB", "FAILED"),
        ("A) cat", "FAILED"),
        ("C.Blue", "FAILED"),
        ("F", "FAILED"),
        ("", "FAILED"),
    ],
)
def test_parse_sqa_answer(text: str, expected: str) -> None:
    assert parse_sqa_answer(text) == expected


@pytest.mark.parametrize(("letter", "n", "expected"), [("E", 5, 4), ("E", 4, -1), ("F", 5, -1), ("FAILED", 3, -1)])
def test_choice_index(letter: str, n: int, expected: int) -> None:
    assert sqa_choice_index(letter, n) == expected


def test_score_sqa_accuracy_and_img_accuracy() -> None:
    img, txt = "<image>\nQuestion?\nA. x\nB. y", "Question?\nA. x\nB. y"
    problems = {
        "p1": {"choices": ["a", "b", "c"], "answer": 1},
        "p2": {"choices": ["a", "b"], "answer": 0},
        "p3": {"choices": ["a", "b", "c", "d"], "answer": 2},
        "p4": {"choices": ["a", "b", "c"], "answer": 2},
        "p5": {"choices": ["a", "b"], "answer": 0},
        "p6": {"choices": ["a", "b", "c", "d"], "answer": 3},
        "p7": {"choices": ["a", "b"], "answer": 1},
    }
    predictions = {
        "p1": {"text": "B", "prompt": img},  # right, image
        "p2": {"text": "The answer is A.", "prompt": txt},  # right, no image
        "p3": {"text": "The answer is C", "prompt": img},  # FAILED, image
        "p4": {"text": "D", "prompt": img},  # beyond 3 choices, image
        # p5 missing: wrong, and no recorded prompt so not in the image subset
        "p6": {"text": "D. fish", "prompt": img},  # right, image
        "p7": {"text": "B", "prompt": txt},  # right, no image
        "other": {"text": "A", "prompt": img},  # not a test problem: ignored
    }
    result = score_sqa(problems, predictions)
    assert result["total"] == 7 and result["correct"] == 4
    assert result["img_total"] == 4 and result["img_correct"] == 2
    assert result["accuracy"] == pytest.approx(400 / 7)
    assert result["img_accuracy"] == pytest.approx(50.0)
