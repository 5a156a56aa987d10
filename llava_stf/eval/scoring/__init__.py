"""Scoring library: LLaVA-1.5's official scoring rules for its nine benchmarks (haotian-liu/LLaVA
``docs/Evaluation.md``, ``llava/eval/`` and ``scripts/``), as pure functions over lists and dicts that never read files
or call a model.

Conventions: accuracy-type results are in percent (0-100, as reported in papers), MME task scores in points (max 200
per task); every function fails loudly (ValueError/KeyError naming both sides) instead of silently dropping samples.
"""

from .exact_match import score_exact_match
from .gqa import gqa_prediction, gqa_prediction_rows, score_gqa
from .mmbench import parse_mmbench_letter, score_mmbench
from .mme import MME_COGNITION_TASKS, MME_PERCEPTION_TASKS, mme_task_metrics, parse_mme_answer, score_mme
from .pope import POPE_SPLITS, pope_metrics, pope_yes_no, score_pope
from .sqa import parse_sqa_answer, score_sqa, sqa_choice_index
from .submission import mmbench_submission, vizwiz_submission, vqav2_submission
from .textvqa import score_textvqa, textvqa_question_from_prompt
from .vqa import normalize_vqa_answer, score_vqa, vqa_accuracy, vqa_answer_scores

__all__ = [
    "MME_COGNITION_TASKS",
    "MME_PERCEPTION_TASKS",
    "POPE_SPLITS",
    "gqa_prediction",
    "gqa_prediction_rows",
    "mme_task_metrics",
    "mmbench_submission",
    "normalize_vqa_answer",
    "parse_mmbench_letter",
    "parse_mme_answer",
    "parse_sqa_answer",
    "pope_metrics",
    "pope_yes_no",
    "score_exact_match",
    "score_gqa",
    "score_mmbench",
    "score_mme",
    "score_pope",
    "score_sqa",
    "score_textvqa",
    "score_vqa",
    "sqa_choice_index",
    "textvqa_question_from_prompt",
    "vizwiz_submission",
    "vqa_accuracy",
    "vqa_answer_scores",
    "vqav2_submission",
]
