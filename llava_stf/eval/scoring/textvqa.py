"""TextVQA validation scoring (haotian-liu/LLaVA ``llava/eval/eval_textvqa.py``): recover the question from each
answer's prompt, join it with the annotations on ``(image_id, question.lower())`` and score with EvalAI VQA accuracy
(``llava_stf.eval.scoring.vqa``).

The answer file's ``question_id`` holds the TextVQA **image id**, because that is what the upstream scorer joins on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .vqa import score_vqa

_OCR_TOKENS_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def textvqa_question_from_prompt(prompt: str) -> str:
    """Recovers the lower-cased question text from a TextVQA answer's ``prompt``, as the upstream scorer does.

    Args:
        prompt: The ``prompt`` field of an answer (the question text without the template).

    Returns:
        The question, lower-cased.

    Raises:
        ValueError: If the prompt matches none of the known layouts.
    """
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = _OCR_TOKENS_QUESTION.search(prompt)
        if match is None:
            raise ValueError(f"TextVQA 'OCR tokens: ' prompt without 'Question: ... Short answer:': {prompt!r}")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"cannot recover the TextVQA question from a {len(lines)}-line prompt: {prompt!r}")
    return question.lower()


def score_textvqa(annotations: Sequence[Mapping[str, Any]], answers: Iterable[Mapping[str, Any]]) -> float:
    """TextVQA accuracy over the answered questions.

    Args:
        annotations: The annotation file's ``data`` list; each entry has ``image_id``, ``question`` and the 10
            ``answers`` strings. Later entries with the same key replace earlier ones, as upstream.
        answers: Answer records with ``question_id`` (the image id), ``prompt`` and ``text``.

    Returns:
        The accuracy in percent, averaged over ``answers``.

    Raises:
        KeyError: If an answer has no annotation with the same image id and question.
    """
    by_key = {(a["image_id"], a["question"].lower()): a for a in annotations}
    samples = []
    for answer in answers:
        key = (answer["question_id"], textvqa_question_from_prompt(answer["prompt"]))
        if key not in by_key:
            raise KeyError(f"no TextVQA annotation for (image_id, question) = {key!r}")
        samples.append((answer["text"], by_key[key]["answers"]))
    return score_vqa(samples)
