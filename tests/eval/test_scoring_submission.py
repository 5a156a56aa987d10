"""Golden cases for the VQAv2, VizWiz and MMBench submission structures.

Formats: haotian-liu/LLaVA ``scripts/convert_{vqav2,vizwiz,mmbench}_for_submission.py``.
"""

import pytest

from llava_stf.eval.scoring import mmbench_submission, vizwiz_submission, vqav2_submission


def test_vqav2_one_entry_per_test_id_in_order() -> None:
    rows = vqav2_submission({1: "Two dogs.", 3: "Yes"}, [3, 1, 2], required_ids=[1, 3])
    assert rows == [
        {"question_id": 3, "answer": "yes"},
        {"question_id": 1, "answer": "2 dogs"},
        {"question_id": 2, "answer": ""},
    ]


def test_vqav2_fails_loudly() -> None:
    with pytest.raises(ValueError, match="1 of 2 required"):
        vqav2_submission({1: "yes"}, [1, 2], required_ids=[1, 2])
    with pytest.raises(ValueError, match="not in the test2015 list"):
        vqav2_submission({99: "yes"}, [1, 2])


def test_vizwiz_rows() -> None:
    questions = [
        {"question_id": 0, "image": "VizWiz_test_00000000.jpg"},
        {"question_id": 1, "image": "VizWiz_test_00000001.jpg"},
    ]
    rows = vizwiz_submission(questions, {1: "Unanswerable", 0: "The Coca-Cola can."})
    assert rows == [
        {"image": "VizWiz_test_00000000.jpg", "answer": "coca cola can"},
        {"image": "VizWiz_test_00000001.jpg", "answer": "unanswerable"},
    ]
    with pytest.raises(ValueError, match="1 of 2"):
        vizwiz_submission(questions, {0: "yes"})


COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
           "comment", "split"]  # fmt: skip


def _row(index: int, question: str, options: list[str], answer: str) -> dict:
    extra = {
        "hint": "h",
        "category": "c",
        "image": "b64",
        "source": "s",
        "l2-category": "l2",
        "comment": "",
        "split": "dev",
    }
    return {"index": index, "question": question, **dict(zip("ABCD", options)), "answer": answer, **extra}


def test_mmbench_table() -> None:
    rows = [_row(10, "Which?", ["cat", "dog", "bird", "fish"], "A"), _row(11, "What?", ["x", "y", "nan", "nan"], "B")]
    answers = [{"question_id": 10, "round_id": 0, "text": "A"}, {"question_id": 10, "round_id": 1, "text": "D"}]
    header, table = mmbench_submission(COLUMNS, rows, answers)
    assert header == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert table == [
        [10, "Which?", "cat", "dog", "bird", "fish", "A", "A", "dev"],  # round 0 wins over the rotated round 1
        [11, "What?", "x", "y", "nan", "nan", None, "B", "dev"],  # unanswered: empty cell, as upstream
    ]


def test_mmbench_missing_column_raises() -> None:
    with pytest.raises(ValueError, match="comment"):
        mmbench_submission([c for c in COLUMNS if c != "comment"], [], [])
