"""Submission structures the evaluation servers accept: VQAv2 test-dev and VizWiz test on EvalAI, MMBench (and
MMBench-CN) on the OpenCompass server, as haotian-liu/LLaVA ``scripts/convert_{vqav2,vizwiz,mmbench}_for_submission.py``
write them. These are pure functions returning rows; serialising them (JSON, ``.xlsx``) and reading answer files belongs
to the benchmark modules.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from typing import Any

from .vqa import normalize_vqa_answer

MMBENCH_DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")
MMBENCH_PREDICTION_POSITION = 6


def vqav2_submission(
    answers: Mapping[Hashable, str],
    test_question_ids: Sequence[Hashable],
    required_ids: Collection[Hashable] | None = None,
) -> list[dict[str, Any]]:
    """The EvalAI VQAv2 result list: one entry per question of the full test2015 list, in its order.

    Answered ids get the EvalAI-normalised text; the others get ``""``, which the server needs to accept a test-dev
    upload (it expects every test2015 id). Upstream (``scripts/convert_vqav2_for_submission.py``) fills these silently;
    pass ``required_ids`` (the test-dev ids) to make a missing test-dev answer an error.

    Args:
        answers: ``{question_id: raw answer text}``.
        test_question_ids: The question ids of ``llava_vqav2_mscoco_test2015.jsonl``, in file order.
        required_ids: Ids that must be answered, or None.

    Returns:
        ``[{"question_id": id, "answer": normalised text or ""}, ...]``.

    Raises:
        ValueError: If an answered id is not in the test list, or a required id is unanswered.
    """
    known = set(test_question_ids)
    unknown = [qid for qid in answers if qid not in known]
    if unknown:
        raise ValueError(f"VQAv2: {len(unknown)} answered ids are not in the test2015 list, e.g. {unknown[:3]}")
    missing = [qid for qid in required_ids or () if qid not in answers]
    if missing:
        raise ValueError(f"VQAv2: {len(missing)} of {len(required_ids)} required ids unanswered, e.g. {missing[:3]}")
    return [
        {"question_id": qid, "answer": normalize_vqa_answer(answers[qid]) if qid in answers else ""}
        for qid in test_question_ids
    ]


def vizwiz_submission(questions: Iterable[Mapping[str, Any]], answers: Mapping[Hashable, str]) -> list[dict[str, str]]:
    """The EvalAI VizWiz result list: ``{"image", "answer"}`` per test question, in question-file order.

    Args:
        questions: Records of ``llava_test.jsonl`` with ``question_id`` and ``image`` (the image file name).
        answers: ``{question_id: raw answer text}``; every question must be answered (upstream asserts this).

    Returns:
        ``[{"image": file name, "answer": EvalAI-normalised text}, ...]``.

    Raises:
        ValueError: If a question is unanswered.
    """
    questions = list(questions)
    missing = [q["question_id"] for q in questions if q["question_id"] not in answers]
    if missing:
        raise ValueError(f"VizWiz: {len(missing)} of {len(questions)} questions unanswered, e.g. {missing[:3]}")
    return [{"image": q["image"], "answer": normalize_vqa_answer(answers[q["question_id"]])} for q in questions]


def mmbench_submission(
    columns: Sequence[str], rows: Iterable[Mapping[str, Any]], answers: Iterable[Mapping[str, Any]]
) -> tuple[list[str], list[list[Any]]]:
    """The MMBench upload table: the TSV without six columns, with ``prediction`` inserted at position 6 (0-based).

    Args:
        columns: The TSV header, in order; it must contain every column in ``MMBENCH_DROPPED_COLUMNS``.
        rows: The TSV rows as ``{column: value}``, in file order.
        answers: Answer records with ``question_id`` (the TSV ``index``), ``text`` and optionally ``round_id``. Only
            round 0 (the TSV's own option order) is used; upstream keeps whichever record comes last, which for an
            ``--all-rounds`` file is a rotated round whose letters do not match the TSV.

    Returns:
        ``(header, table_rows)``: the header (e.g. ``index, question, A, B, C, D, prediction, answer``) and one list of
        values per TSV row; ``prediction`` is the raw answer text, or None for an unanswered row (as upstream).

    Raises:
        ValueError: If a column to drop is missing (pandas raises there too) or the header is too short.
    """
    absent = [c for c in MMBENCH_DROPPED_COLUMNS if c not in columns]
    if absent:
        raise ValueError(f"MMBench TSV lacks columns {absent}; header: {list(columns)}")
    header = [c for c in columns if c not in MMBENCH_DROPPED_COLUMNS]
    if len(header) < MMBENCH_PREDICTION_POSITION:
        raise ValueError(f"MMBench TSV keeps {len(header)} columns, fewer than {MMBENCH_PREDICTION_POSITION}: {header}")
    predictions = {a["question_id"]: a["text"] for a in answers if a.get("round_id", 0) == 0}
    table = []
    for row in rows:
        values = [row[c] for c in header]
        values.insert(MMBENCH_PREDICTION_POSITION, predictions.get(row["index"]))
        table.append(values)
    header.insert(MMBENCH_PREDICTION_POSITION, "prediction")
    return header, table
