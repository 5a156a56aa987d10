"""MMBench and MMBench-CN: multiple choice over a TSV with base64 images.

Questions ``mmbench/mmbench_dev_20230712.tsv`` (CN: ``mmbench_cn/mmbench_dev_cn_20231003.tsv``), answers
``<folder>/answers/<split>/<ckpt>.jsonl``, upload ``<folder>/answers_upload/<split>/<ckpt>.xlsx`` for the OpenCompass
server (the TSV without six columns, ``prediction`` inserted at position 6, as upstream's
``scripts/convert_mmbench_for_submission.py``). The prompt is upstream's ``llava/eval/model_vqa_mmbench.py``:
``hint\\nquestion\\nA. ...\\nB. ...`` plus the suffix; the recorded prompt has no suffix. With ``--all-rounds`` every
rotation of the options is asked, so splits with an ``answer`` column (dev) get a local CircularEval; otherwise the
local number is round-0 accuracy. The paper's MMB columns come from the server.
"""

from __future__ import annotations

import csv
import string
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..engine import InlineImage, Sample, sample_keys
from ..scoring import mmbench_submission, score_mmbench
from ..xlsx import write_xlsx
from .base import (
    MULTIPLE_CHOICE,
    MULTIPLE_CHOICE_CN,
    Benchmark,
    Options,
    QuestionFileError,
    Result,
    problem_list,
    repeated_ids,
    require,
)

OPTION_COLUMNS = ("A", "B", "C", "D")
SERVER = "OpenCompass MMBench evaluation server (CircularEval)"
# Strings pandas.read_table reads as NaN (its default na_values), which upstream's is_none treats as absent.
_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA"}
_NA |= {"NULL", "NaN", "None", "n/a", "nan", "null", "none"}


def _is_none(value: str | None) -> bool:
    return value is None or value in _NA or value.lower() in ("nan", "none")


def read_tsv(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Header and rows of an MMBench TSV; ``index`` becomes an int (as pandas reads it)."""
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with require(path, "MMBench TSV").open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = list(reader)
        header = list(reader.fieldnames or [])
    absent = [c for c in ("index", "question", "image", "A") if c not in header]
    if absent:
        raise QuestionFileError(f"{path}: the MMBench TSV lacks columns {absent}; header: {header}")
    seen: dict[str, list[tuple[int, Any]]] = {}
    for number, row in enumerate(rows, 2):
        row["index"] = int(row["index"]) if str(row["index"]).lstrip("-").isdigit() else row["index"]
        seen.setdefault(str(row["index"]), []).append((number, row["index"]))
    problems = repeated_ids(seen, "index")
    if problems:
        raise QuestionFileError(problem_list(path, problems))
    return header, rows


def _samples(folder: Path, split: str, options: Options, suffix: str) -> list[Sample]:
    _, rows = read_tsv(folder / f"{split}.tsv")
    questions = []
    for row in rows:
        choices = []
        for column in OPTION_COLUMNS:
            if column not in row or _is_none(row[column]):
                break
            choices.append(row[column])
        letters = list(string.ascii_uppercase[: len(choices)])
        for round_id in range(len(choices) if options.all_rounds else 1):
            shown, chars = choices[round_id:] + choices[:round_id], letters[round_id:] + letters[:round_id]
            question = row["question"] if _is_none(row.get("hint")) else f"{row['hint']}\n{row['question']}"
            question += "".join(f"\n{letter}. {option}" for letter, option in zip(letters, shown))
            extra = {"round_id": round_id, "options": shown, "option_char": chars}
            questions.append((f"{row['index']}:{round_id}", row["index"], question, InlineImage(row["image"]), extra))
    keys = sample_keys(q[0] for q in questions)
    return [Sample(key, idx, q + suffix, q, image, extra) for key, (_, idx, q, image, extra) in zip(keys, questions)]


def _answers(folder: Path, split: str, model_id: str) -> Path:
    return folder / "answers" / split / f"{model_id}.jsonl"


def _evaluate(
    folder: Path, split: str, records: Sequence[Mapping[str, Any]], model_id: str, options: Options
) -> Result:
    header, rows = read_tsv(folder / f"{split}.tsv")
    upload = folder / "answers_upload" / split / f"{model_id}.xlsx"
    write_xlsx(upload, *mmbench_submission(header, rows, records))
    notes = [f"upload {upload} to the {SERVER}; the paper's numbers are the server's test-split CircularEval"]
    if "answer" not in header or any(_is_none(row["answer"]) for row in rows):
        return Result({}, None, files=[str(upload)], notes=[*notes, "no answer column: no local score"])
    metrics = score_mmbench(records, {row["index"]: row["answer"] for row in rows})
    circular = options.all_rounds and metrics["incomplete"] == 0
    metric = "circular_accuracy" if circular else "round0_accuracy"
    return Result(metrics, metrics[metric], metric, [str(upload)], notes)


def _benchmark(name: str, column: str, folder: str, split: str, suffix: str) -> Benchmark:
    return Benchmark(
        name=name,
        column=column,
        folder=folder,
        default_split=split,
        max_new_tokens=1024,
        load=lambda path, split, options: _samples(path, split, options, suffix),
        answers_path=_answers,
        evaluate=_evaluate,
        question_path=lambda folder, split: folder / f"{split}.tsv",
        server=SERVER,
    )


MMBENCH = _benchmark("mmbench", "MMB", "mmbench", "mmbench_dev_20230712", MULTIPLE_CHOICE)
MMBENCH_CN = _benchmark("mmbench_cn", "MMB-CN", "mmbench_cn", "mmbench_dev_cn_20231003", MULTIPLE_CHOICE_CN)
