"""EvalAI answer normalisation and VQA soft accuracy, as used by VQAv2, VizWiz and TextVQA.

Upstream: haotian-liu/LLaVA ``llava/eval/m4c_evaluator.py`` (``EvalAIAnswerProcessor``, itself copied from
facebookresearch/mmf, and ``TextVQAAccuracyEvaluator``). The leave-one-out soft accuracy is the official VQA tool's
(GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``).

``normalize_vqa_answer`` reproduces the EvalAI answer processor step by step, quirks included (at most 32 periods
removed, the reversed ``somebody'd`` contraction, capitalised contraction keys that never match), so that local scores
stay comparable with the servers and published work. The lookup tables live in ``vqa_normalization_tables.json``
beside this file. ``vqa_answer_scores`` computes the leave-one-out soft score of every distinct human answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from functools import cache
from importlib import resources
from typing import Any

NUM_VQA_ANSWERS = 10

# Upstream writes ``(?!<=\d)(\.)(?!\d)``: the look-behind typo makes the first group a look-ahead for the literal "<="
# plus a digit, which never matches in front of a ".", so only "not followed by a digit" takes effect.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
# Upstream passes ``re.UNICODE`` (== 32) as the positional ``count`` of ``re.sub``: at most 32 periods are removed.
_PERIOD_STRIP_COUNT = 32
_COMMA_STRIP = re.compile(r"(?<=\d)(,)+(?=\d)")


@cache
def _tables() -> dict[str, Any]:
    """The contraction, number-word, article and punctuation tables (read once, never mutated)."""
    text = resources.files(__package__).joinpath("vqa_normalization_tables.json").read_text(encoding="utf-8")
    return json.loads(text)


def _word_tokenize(text: str) -> str:
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def _process_punctuation(text: str) -> str:
    out = text
    for p in _tables()["punctuation"]:
        # The test looks at the text as it entered this step (``text``), not at the partially rewritten ``out``.
        # The digit-comma-digit test cannot fire after ``_word_tokenize``; it is kept for fidelity.
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    tables = _tables()
    numbers, articles, contractions = tables["number_words"], set(tables["articles"]), tables["contractions"]
    # Upstream looks number words up with ``dict.setdefault`` and so grows the table with every word it sees.
    # ``dict.get`` gives the same words without mutating anything.
    words = [numbers.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in articles]
    return " ".join(contractions.get(word, word) for word in words)


def normalize_vqa_answer(text: str) -> str:
    """Normalises one answer exactly as the EvalAI VQA answer processor does.

    Args:
        text: A model prediction or a human ground-truth answer.

    Returns:
        The normalised answer: lower-case, punctuation handled, number words as digits, no articles, contractions
        with their apostrophes restored.
    """
    text = _word_tokenize(text)
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _process_punctuation(text)
    return _process_digit_article(text)


def vqa_answer_scores(gt_answers: Sequence[str]) -> dict[str, float]:
    """Soft score of every distinct (normalised) human answer to one question.

    ``score(a)`` is the mean, over the 10 leave-one-out subsets of 9 annotators, of ``min(1, matches / 3)``.

    Args:
        gt_answers: The 10 raw human answers.

    Returns:
        ``{normalised_answer: score}`` with scores in [0, 1] (0.3, 0.6, 0.9 or 1.0 for 1, 2, 3 or >= 4 matches).

    Raises:
        ValueError: If there are not exactly 10 answers.
    """
    if len(gt_answers) != NUM_VQA_ANSWERS:
        raise ValueError(f"VQA accuracy needs {NUM_VQA_ANSWERS} human answers per question, got {len(gt_answers)}")
    answers = [normalize_vqa_answer(a) for a in gt_answers]
    scores = {}
    for candidate in set(answers):
        subset_scores = []
        for left_out in range(len(answers)):
            matches = sum(1 for i, a in enumerate(answers) if i != left_out and a == candidate)
            subset_scores.append(min(1.0, matches / 3))
        scores[candidate] = sum(subset_scores) / len(subset_scores)
    return scores


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQA soft accuracy of one prediction.

    Args:
        prediction: The raw model answer (normalised here).
        gt_answers: The 10 raw human answers.

    Returns:
        The score in [0, 1]; 0 when the normalised prediction matches no human answer.
    """
    return vqa_answer_scores(gt_answers).get(normalize_vqa_answer(prediction), 0.0)


def score_vqa(samples: Iterable[tuple[str, Sequence[str]]]) -> float:
    """Benchmark VQA accuracy: the mean soft accuracy x 100.

    Args:
        samples: ``(prediction, gt_answers)`` pairs, one per answered question.

    Returns:
        The accuracy in percent.

    Raises:
        ValueError: If ``samples`` is empty.
    """
    scores = [vqa_accuracy(prediction, gt_answers) for prediction, gt_answers in samples]
    if not scores:
        raise ValueError("score_vqa got no samples")
    return 100.0 * sum(scores) / len(scores)
