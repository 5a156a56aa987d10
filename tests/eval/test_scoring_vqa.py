"""Golden cases for EvalAI answer normalisation and VQA soft accuracy, worked out by hand.

Rules: haotian-liu/LLaVA ``llava/eval/m4c_evaluator.py`` (``EvalAIAnswerProcessor``, ``TextVQAAccuracyEvaluator``).
"""

import pytest

from llava_stf.eval.scoring import normalize_vqa_answer, score_vqa, vqa_accuracy, vqa_answer_scores
from llava_stf.eval.scoring.vqa import _tables


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # contractions restore apostrophes; words that already have them are untouched
        ("Dont know", "don't know"),
        ("Dont.", "don't"),
        ("whats", "what's"),
        ("oclock", "o'clock"),
        ("twas", "'twas"),
        ("don't", "don't"),
        # "'s" is split off first, so "what's" and "whats" normalise differently
        ("what's", "what 's"),
        ("The cat's toy", "cat 's toy"),
        # quirks kept: the reversed entry, and capitalised keys that can never match lower-cased text
        ("somebody'd", "somebodyd"),
        ("Im", "im"),
        ("Ive", "ive"),
        # number words (12 entries only) and articles
        ("Two dogs.", "2 dogs"),
        ("ten", "10"),
        ("zero", "0"),
        ("eleven", "eleven"),
        ("None of the above", "0 of above"),
        ("An apple", "apple"),
        ("a/b", "b"),
        ("(a)", ""),
        # commas and question marks are deleted outright, so digit-comma-digit never survives
        ("1,000", "1000"),
        ("Is it red?", "is it red"),
        # punctuation: replaced by a space unless it touches a space somewhere in the text, then deleted everywhere
        ("Yes!", "yes"),
        ("black-and-white", "black and white"),
        ("black - white", "black white"),
        ("hello@world", "hello world"),
        ("hi @ you", "hi you"),
        ('He said "hi"', "he said hi"),
        ("z/w and x /y", "zw and x y"),
        # the space test looks at the text as it entered the step, not at the text after ';' became a space
        ("x;/y z/w", "x y z w"),
        # periods: removed unless followed by a digit
        ("3.5", "3.5"),
        ("1.5.", "1.5"),
        (".5", ".5"),
        ("2..", "2"),
        ("Mr. Smith's dog", "mr smith 's dog"),
        # newlines and tabs
        ("yes\nno", "yes no"),
        ("red\tcar", "red car"),
        ("  Yes  ", "yes"),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_at_most_32_periods_are_removed() -> None:
    # 40 periods, none followed by a digit: upstream passes 32 as re.sub's count, so 8 survive.
    assert normalize_vqa_answer("." * 40) == "." * 8
    assert normalize_vqa_answer("." * 32) == ""


def test_tables_are_complete_and_never_mutated() -> None:
    tables = _tables()
    sizes = {name: len(tables[name]) for name in ("contractions", "number_words", "articles", "punctuation")}
    assert sizes == {"contractions": 120, "number_words": 12, "articles": 3, "punctuation": 21}
    normalize_vqa_answer("foo bar baz")  # upstream's setdefault would add these words to the number table
    assert len(_tables()["number_words"]) == 12


@pytest.mark.parametrize(("k", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_soft_accuracy_closed_form(k: int, expected: float) -> None:
    gt = ["yes"] * k + ["no"] * (10 - k)
    assert vqa_accuracy("yes", gt) == pytest.approx(expected)


def test_answer_scores_use_normalised_answers() -> None:
    # "Two", "two." and "2 " all normalise to "2" (k=4); "a dog"/"The dog" to "dog" (k=3); "cat" alone (k=1).
    gt = ["Two", "two.", "2 ", "2", "a dog", "The dog", "dog", "cat", "3", "3"]
    assert vqa_answer_scores(gt) == pytest.approx({"2": 1.0, "dog": 0.9, "cat": 0.3, "3": 0.6})
    assert vqa_accuracy("two", gt) == pytest.approx(1.0)
    assert vqa_accuracy("Dog.", gt) == pytest.approx(0.9)
    assert vqa_accuracy("four", gt) == 0.0


def test_score_vqa_is_mean_times_100() -> None:
    samples = [("yes", ["yes"] + ["no"] * 9), ("No.", ["no"] * 10)]
    assert score_vqa(samples) == pytest.approx(65.0)


def test_needs_exactly_ten_answers() -> None:
    with pytest.raises(ValueError, match="10"):
        vqa_accuracy("yes", ["yes"] * 9)
    with pytest.raises(ValueError):
        score_vqa([])
