"""MME scoring, as the official ``calculation.py``: parse each answer to yes/no/other, then per task ``acc`` (over
questions) and ``acc+`` (over images with both questions right), task score = (acc + acc+) x 100, Perception = sum of
the 10 perception tasks (max 2000) and Cognition = sum of the 4 cognition tasks (max 800).

``calculation.py`` is part of MME's ``eval_tool`` (BradyFU/Awesome-Multimodal-Large-Language-Models, ``Evaluation``
branch; paper arXiv 2306.13394). It pairs the two questions of an image by consecutive lines of the converted file;
here they are grouped by ``(category, image)``, and every image must have exactly two questions (it asserts the same).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

MME_PERCEPTION_TASKS = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION_TASKS = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_mme_answer(text: str) -> str:
    """Maps an MME answer to ``"yes"``, ``"no"`` or ``"other"`` (always wrong).

    The text is lower-cased; exactly ``yes``/``no`` is kept; otherwise its first 4 characters decide: containing
    ``yes`` gives yes, else containing ``no`` gives no, else other. (lmms-eval's extra ``.``/``y``/``n`` handling is
    not part of the LLaVA-1.5 protocol.)

    Args:
        text: The model's answer.

    Returns:
        ``"yes"``, ``"no"`` or ``"other"``.
    """
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_task_metrics(records: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """``acc``, ``acc+`` and score of one MME task.

    Args:
        records: The task's questions, each with ``image``, ``ground_truth`` (``Yes``/``No``, any case) and
            ``prediction`` (raw answer text).

    Returns:
        ``{"acc", "acc_plus"}`` as fractions, ``"score"`` = (acc + acc_plus) x 100, and ``"other"`` = the number of
        answers parsed as other.

    Raises:
        ValueError: If the task is empty, a ground truth is not yes/no, or an image does not have exactly 2 questions.
    """
    by_image: dict[Any, list[bool]] = {}
    other = 0
    for record in records:
        gt = record["ground_truth"].lower()
        if gt not in ("yes", "no"):
            raise ValueError(f"MME ground truth must be yes or no, got {record['ground_truth']!r}")
        pred = parse_mme_answer(record["prediction"])
        other += pred == "other"
        by_image.setdefault(record["image"], []).append(pred == gt)
    if not by_image:
        raise ValueError("mme_task_metrics got no records")
    odd = {image: len(hits) for image, hits in by_image.items() if len(hits) != 2}
    if odd:
        raise ValueError(f"MME needs exactly 2 questions per image; question counts: {dict(list(odd.items())[:3])}")
    hits = [hit for pair in by_image.values() for hit in pair]
    acc = sum(hits) / len(hits)
    acc_plus = sum(all(pair) for pair in by_image.values()) / len(by_image)
    return {"acc": acc, "acc_plus": acc_plus, "score": 100.0 * (acc + acc_plus), "other": other}


def score_mme(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """MME task scores, Perception and Cognition.

    Args:
        records: Questions with ``category`` (a task name), ``image``, ``ground_truth`` and ``prediction``.

    Returns:
        ``{"tasks": {task: mme_task_metrics(...)}, "perception": float | None, "cognition": float | None}``; a
        total is None unless all of its tasks are present, so a partial run never looks like a full score.

    Raises:
        ValueError: If a category is not one of the 14 MME tasks (or as ``mme_task_metrics``).
    """
    valid = MME_PERCEPTION_TASKS + MME_COGNITION_TASKS
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        if record["category"] not in valid:
            raise ValueError(f"unknown MME category {record['category']!r}; valid: {', '.join(valid)}")
        by_task.setdefault(record["category"], []).append(record)
    tasks = {task: mme_task_metrics(by_task[task]) for task in valid if task in by_task}

    def total(names: tuple[str, ...]) -> float | None:
        return sum(tasks[t]["score"] for t in names) if all(t in tasks for t in names) else None

    return {"tasks": tasks, "perception": total(MME_PERCEPTION_TASKS), "cognition": total(MME_COGNITION_TASKS)}
