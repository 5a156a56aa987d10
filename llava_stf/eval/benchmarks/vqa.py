"""Any LLaVA question file as a benchmark: exact match after LLaVA's VQA normalisation, overall and per category.

``python -m llava_stf.eval --benchmark vqa --questions my/q.jsonl [--image-folder my/images] [--ground-truth
my/answers.jsonl] --model-path CKPT``. Questions: LLaVA's question JSONL (``question_id``, ``image`` relative to the
image folder, ``text`` as the model sees it, optional ``category``), read as upstream's ``model_vqa_loader`` reads
it; ids must be unique (``7`` and ``"7"`` are one id). Images: ``--image-folder``, default the question file's
folder. Ground truth (optional): JSON lines ``question_id``, ``answer``, optional ``category`` (else the question's);
it must answer every question, and it is checked with the questions, before any model loads. Model answers:
``<question folder>/answers/<question-file stem>/<model id>.jsonl``. A prediction is right when it equals the answer
after the EvalAI normalisation LLaVA uses for VQA (lower case, punctuation, number words as digits, no articles); the
headline is the accuracy over all questions, and each category gets its own. ``vqa_benchmark`` builds the same
benchmark over a fixed folder layout: the demo's ``synthetic`` is one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..engine import Sample
from ..scoring import score_exact_match
from .base import QUESTION_FIELDS, Benchmark, Options, QuestionFileError, Result, jsonl_samples, read_records, require


def read_ground_truth(path: Path, question_ids: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """``{str(question_id): {"answer", "category"}}`` from a ground-truth JSONL that answers every question.

    Raises:
        QuestionFileError: Listing malformed lines, missing fields, repeated ids, and questions without an answer.
    """
    truth = {str(r["question_id"]): r for r in read_records(path, ("question_id", "answer"), what="ground-truth file")}
    unanswered = [qid for qid in question_ids if str(qid) not in truth]
    if unanswered:
        raise QuestionFileError(f"{path}: no answer for {len(unanswered)} question(s), e.g. ids {unanswered[:5]}")
    return {qid: {"answer": str(r["answer"]), "category": r.get("category")} for qid, r in truth.items()}


def vqa_benchmark(
    name: str,
    column: str,
    folder: str,
    default_split: str,
    max_new_tokens: int,
    question_path: Callable[[Path, str], Path],
    image_folder: Callable[[Path, str, Options], Path],
    ground_truth: Callable[[Path, str, Options], Path | None],
    answers_path: Callable[[Path, str, str], Path],
    takes_files: bool = False,
) -> Benchmark:
    """An exact-match VQA benchmark over the given layout (each path a function of folder, split and options)."""

    def question_file(folder: Path, split: str, options: Options) -> Path:
        return options.questions if takes_files and options.questions else question_path(folder, split)

    def load(folder: Path, split: str, options: Options) -> list[Sample]:
        samples = jsonl_samples(question_file(folder, split, options), image_folder(folder, split, options))
        truth = ground_truth(folder, split, options)
        if truth is not None:  # checked now, so a bad ground truth is an error before any model loads
            read_ground_truth(require(truth, "ground-truth file"), [s.question_id for s in samples])
        return samples

    def evaluate(folder: Path, split: str, records: Sequence[Mapping[str, Any]], model_id: str, opts: Options):
        truth_file = ground_truth(folder, split, opts)
        if truth_file is None:
            return Result({}, None, notes=["no ground truth given (--ground-truth FILE): answers only, no score"])
        questions = read_records(question_file(folder, split, opts), QUESTION_FIELDS)
        truth = read_ground_truth(truth_file, [q["question_id"] for q in questions])
        categories = {str(q["question_id"]): truth[str(q["question_id"])]["category"] or q.get("category")
                      for q in questions}  # fmt: skip
        answers = {qid: t["answer"] for qid, t in truth.items()}
        metrics = score_exact_match({str(r["question_id"]): r["text"] for r in records}, answers, categories)
        per = [f"{k.removeprefix('accuracy_')} {v:.1f}%" for k, v in metrics.items() if k.startswith("accuracy_")]
        note = f"accuracy {metrics['accuracy']:.1f}% of {metrics['questions']} questions" + (
            f" ({', '.join(per)})" if per else ""
        )
        return Result(metrics, metrics["accuracy"], "accuracy", notes=[note])

    return Benchmark(
        name=name,
        column=column,
        folder=folder,
        default_split=default_split,
        max_new_tokens=max_new_tokens,
        load=load,
        answers_path=answers_path,
        evaluate=evaluate,
        question_path=question_path,
        takes_files=takes_files,
    )


VQA = vqa_benchmark(
    name="vqa",
    column="VQA",
    folder="vqa",
    default_split="questions",
    max_new_tokens=128,
    question_path=lambda folder, split: folder / f"{split}.jsonl",
    image_folder=lambda folder, split, options: options.image_folder or folder,
    ground_truth=lambda folder, split, options: options.ground_truth,
    answers_path=lambda folder, split, model_id: folder / "answers" / split / f"{model_id}.jsonl",
    takes_files=True,
)
