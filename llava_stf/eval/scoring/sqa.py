"""ScienceQA-IMG scoring (haotian-liu/LLaVA ``llava/eval/eval_science_qa.py``): parse the option letter from the answer
text with the upstream rules, count a letter beyond the problem's choices or a missing prediction as wrong, and report
both ``Accuracy`` (all test problems) and ``IMG-Accuracy`` (answers whose recorded prompt contains ``<image>``), which
is the number LLaVA-1.5 reports as "SQA".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

SQA_OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"

# The final "." is deliberately left unescaped: upstream's pattern (``eval_science_qa.py``) matches ANY character after
# the letter, and reproducing it keeps our numbers comparable with published SQA scores. Consequences: "The answer is
# B, because ..." parses as B, while "The answer is B" at the very end of the text (no character after it) fails.
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_sqa_answer(text: str) -> str:
    """The option letter a ScienceQA answer chooses, or ``"FAILED"``.

    Rules, in order: the whole text is one of ``A``-``E``; or it is at least 3 characters long, starts with one of
    ``A``-``E`` and its characters 2-3 are ``". "``; or the pattern ``The answer is ([A-Z]).`` matches exactly once.

    Args:
        text: The model's answer.

    Returns:
        A capital letter (possibly beyond ``E`` via the pattern), or ``"FAILED"``.
    """
    if text in SQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    matches = _ANSWER_IS.findall(text)
    return matches[0] if len(matches) == 1 else FAILED


def sqa_choice_index(letter: str, num_choices: int) -> int:
    """The 0-based choice index of a parsed letter, or -1 when it is not among the problem's first letters.

    Args:
        letter: The output of ``parse_sqa_answer``.
        num_choices: How many choices the problem has.

    Returns:
        The index, or -1 (``"FAILED"``, a letter beyond ``E`` or beyond the number of choices).
    """
    options = SQA_OPTIONS[:num_choices]
    return options.index(letter) if letter in options else -1


def score_sqa(
    problems: Mapping[str, Mapping[str, Any]], predictions: Mapping[str, Mapping[str, Any]]
) -> dict[str, float]:
    """ScienceQA accuracy over the given (test-split) problems.

    A problem without a prediction counts as wrong. Following upstream, the image subset is decided by the recorded
    prompt (``"<image>" in prediction["prompt"]``), so a problem without a prediction (no recorded prompt) counts in
    ``accuracy`` but not in ``img_accuracy``.

    Args:
        problems: ``{problem_id: problem}`` for the test split; each has ``choices`` (list) and ``answer`` (0-based
            index). Predictions for other ids are ignored.
        predictions: ``{problem_id: {"text": answer text, "prompt": recorded prompt}}``.

    Returns:
        ``{"accuracy", "img_accuracy"}`` in percent (``img_accuracy`` is NaN when no prompt has an image) and the
        counts ``{"total", "correct", "img_total", "img_correct"}``.

    Raises:
        ValueError: If ``problems`` is empty.
    """
    if not problems:
        raise ValueError("score_sqa got no problems")
    correct = img_total = img_correct = 0
    for pid, problem in problems.items():
        prediction = predictions.get(pid)
        text = prediction["text"] if prediction is not None else FAILED
        is_img = prediction is not None and "<image>" in prediction["prompt"]
        hit = sqa_choice_index(parse_sqa_answer(text), len(problem["choices"])) == problem["answer"]
        correct += hit
        img_total += is_img
        img_correct += hit and is_img
    return {
        "accuracy": 100.0 * correct / len(problems),
        "img_accuracy": 100.0 * img_correct / img_total if img_total else float("nan"),
        "total": len(problems),
        "correct": correct,
        "img_total": img_total,
        "img_correct": img_correct,
    }
