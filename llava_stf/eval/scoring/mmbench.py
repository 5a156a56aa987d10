"""MMBench local dev scoring: parse the chosen option letter from free-form text, map it back through the rotation
recorded in ``option_char`` (haotian-liu/LLaVA ``llava/eval/model_vqa_mmbench.py``), and apply CircularEval: a question
counts only if every recorded rotation of its options is answered correctly. The official numbers come from the
OpenCompass server, whose answer extraction is unverified; the letter parser here is a local approximation (see
``parse_mmbench_letter``).
"""

from __future__ import annotations

import string
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

# Characters treated as separators around a bare letter, as in VLMEvalKit's ``can_infer_option``.
_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def parse_mmbench_letter(text: str, options: Sequence[str]) -> str | None:
    """The displayed option letter an answer chooses, or None.

    The server's extraction is not reproduced here; this follows the rule-based part of VLMEvalKit's
    ``can_infer``: first, exactly one of the letters ``A``, ``B``, ... (one per option) appears as a stand-alone
    token once ``.()[],:;!*#{}`` become spaces (``"B"``, ``"B. cat"``, ``"(B)"``, ``"The answer is B."``); otherwise,
    exactly one option text appears (case-insensitively) inside the answer.

    Args:
        text: The model's answer.
        options: The option texts in the order they were shown (letters ``A``, ``B``, ... in that order).

    Returns:
        The displayed letter, or None when no single option can be inferred.
    """
    letters = string.ascii_uppercase[: len(options)]
    tokens = set(text.translate(_SEPARATORS).split())
    found = [letter for letter in letters if letter in tokens]
    if len(found) == 1:
        return found[0]
    lowered = text.lower()
    found = [letter for letter, option in zip(letters, options) if str(option).lower() in lowered]
    return found[0] if len(found) == 1 else None


def _original_letter(record: Mapping[str, Any]) -> str | None:
    options = record["options"]
    shown = parse_mmbench_letter(record["text"], options)
    if shown is None:
        return None
    # ``option_char[i]`` is the TSV letter of the option shown at position i (upstream rotates it with the options).
    original = record.get("option_char") or string.ascii_uppercase[: len(options)]
    return original[string.ascii_uppercase.index(shown)]


def score_mmbench(records: Iterable[Mapping[str, Any]], answers: Mapping[Hashable, str]) -> dict[str, float]:
    """Circular and single-round accuracy on a split with answers (the dev TSV has an ``answer`` column).

    Args:
        records: Answer-file records with ``question_id`` (the TSV ``index``), ``text``, ``options`` (texts in shown
            order) and optionally ``round_id`` (default 0) and ``option_char`` (TSV letters in shown order; default
            ``A``, ``B``, ...).
        answers: ``{index: correct TSV letter}`` for every answered question.

    Returns:
        In percent, ``circular_accuracy`` (all recorded rounds correct) and ``round0_accuracy`` (round 0 only, the
        default one-round protocol); counts ``questions`` and ``incomplete`` (questions with fewer rounds than options,
        for which the circular check is weaker than the server's).

    Raises:
        ValueError: If there are no records, a question has no answer or no round 0, or a round is recorded twice.
    """
    rounds: dict[Hashable, dict[int, bool]] = {}
    num_options: dict[Hashable, int] = {}
    for record in records:
        qid, round_id = record["question_id"], record.get("round_id", 0)
        if qid not in answers:
            raise ValueError(f"MMBench question {qid!r} has no answer; local scoring needs the dev split's answers")
        group = rounds.setdefault(qid, {})
        if round_id in group:
            raise ValueError(f"MMBench question {qid!r} has round {round_id} twice")
        group[round_id] = _original_letter(record) == answers[qid]
        num_options[qid] = len(record["options"])
    if not rounds:
        raise ValueError("score_mmbench got no records")
    no_round0 = [qid for qid, group in rounds.items() if 0 not in group]
    if no_round0:
        raise ValueError(f"MMBench: {len(no_round0)} questions have no round 0, e.g. {no_round0[:3]}")
    return {
        "circular_accuracy": 100.0 * sum(all(g.values()) for g in rounds.values()) / len(rounds),
        "round0_accuracy": 100.0 * sum(g[0] for g in rounds.values()) / len(rounds),
        "questions": len(rounds),
        "incomplete": sum(len(g) < num_options[qid] for qid, g in rounds.items()),
    }
