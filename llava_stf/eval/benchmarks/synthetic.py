"""The generated visual-QA world (``llava_stf.data.synthetic``): the generic VQA benchmark (``vqa``) over its layout.

Layout under the data root (what ``python -m llava_stf.data.synthetic --out <root>/synthetic`` writes): questions
``synthetic/eval/questions.jsonl`` (``category`` = question family), images ``synthetic/images/`` (the question's
``image`` is relative to ``synthetic/``), ground truth ``synthetic/eval/answers.jsonl``, model answers
``synthetic/eval/model_answers/<model id>.jsonl`` (another split, e.g. the blank-image control ``questions_blank``
with ground truth ``answers_blank.jsonl``: ``model_answers/<split>/<model id>.jsonl``, so the two never resume each
other's answers). Scored as ``vqa``: exact match after LLaVA's VQA normalisation, overall and per family. Answers are
one or two words, so generation stops after 16 tokens.
"""

from __future__ import annotations

from pathlib import Path

from ..scoring import score_exact_match
from .vqa import vqa_benchmark

score_synthetic = score_exact_match  # the demo's name for the scorer


def _answers(folder: Path, split: str, model_id: str) -> Path:
    answers = folder / "eval" / "model_answers"
    return answers / f"{model_id}.jsonl" if split == "questions" else answers / split / f"{model_id}.jsonl"


SYNTHETIC = vqa_benchmark(
    name="synthetic",
    column="Synth",
    folder="synthetic",
    default_split="questions",
    max_new_tokens=16,
    question_path=lambda folder, split: folder / "eval" / f"{split}.jsonl",
    image_folder=lambda folder, split, options: folder,
    ground_truth=lambda folder, split, options: folder / "eval" / f"{split.replace('questions', 'answers')}.jsonl",
    answers_path=_answers,
)
