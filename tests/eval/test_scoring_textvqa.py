"""Golden cases for TextVQA question recovery and scoring (haotian-liu/LLaVA llava/eval/eval_textvqa.py)."""

import pytest

from llava_stf.eval.scoring import score_textvqa, textvqa_question_from_prompt

SUFFIX = "Answer the question using a single word or phrase."


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (f"What is written?\nReference OCR token: STOP, sign\n{SUFFIX}", "what is written?"),
        (f"Reference OCR token: NIKE\nWhat Brand?\n{SUFFIX}", "what brand?"),
        ("OCR tokens: a, b Question: What is It? Short answer:", "what is it?"),
        (f"What Color?\n{SUFFIX}", "what color?"),
    ],
)
def test_question_from_prompt(prompt: str, expected: str) -> None:
    assert textvqa_question_from_prompt(prompt) == expected


@pytest.mark.parametrize("prompt", ["one line only", f"a\nb\n{SUFFIX}", "a\nb\nc\nd"])
def test_unknown_prompt_layout_raises(prompt: str) -> None:
    with pytest.raises(ValueError):
        textvqa_question_from_prompt(prompt)


def test_score_textvqa_joins_on_image_id_and_question() -> None:
    annotations = [
        {"image_id": "img1", "question": "What brand is this?", "answers": ["Nike"] * 2 + ["nike"] + ["adidas"] * 7},
        {"image_id": "img1", "question": "What color is the logo?", "answers": ["white"] * 10},
    ]
    answers = [
        {"question_id": "img1", "prompt": f"What brand is this?\nReference OCR token: NIKE\n{SUFFIX}", "text": "Nike"},
        {"question_id": "img1", "prompt": f"What color is the logo?\n{SUFFIX}", "text": "White."},
    ]
    # "nike" matches 3 annotators -> 0.9; "white" matches 10 -> 1.0; mean 0.95.
    assert score_textvqa(annotations, answers) == pytest.approx(95.0)
    with pytest.raises(KeyError):
        score_textvqa(annotations, [{"question_id": "img2", "prompt": f"What brand is this?\n{SUFFIX}", "text": "x"}])
