"""MME: yes/no parsing, per-task acc + acc+, headline Perception (sum of 10 tasks, max 2000).

Questions ``MME/llava_mme.jsonl`` (``question_id`` is the image path, shared by an image's two questions), images
and ground truth ``MME/MME_Benchmark_release_version/``, answers ``MME/answers/<ckpt>.jsonl``. Like upstream's
``convert_answer_to_mme.py`` this restores " Please answer yes or no." to match each answer with its ground truth
and writes ``MME/eval_tool/answers/<ckpt>/<category>.txt`` for the official ``calculation.py`` (MME's
``eval_tool``, BradyFU/Awesome-Multimodal-Large-Language-Models, ``Evaluation`` branch), as haotian-liu/LLaVA
``scripts/v1_5/eval/mme.sh`` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..answers import write_text_atomic
from ..engine import Sample
from ..scoring import score_mme
from .base import Benchmark, Options, Result, jsonl_samples, missing

RELEASE = "MME_Benchmark_release_version"
SHORT_ANSWER_TEXT = "Answer the question using a single word or phrase."
YES_NO = " Please answer yes or no."


def _load(folder: Path, split: str, options: Options) -> list[Sample]:
    return jsonl_samples(folder / f"{split}.jsonl", folder / RELEASE, unique_ids=False)  # id: the image path


def _answers(folder: Path, split: str, model_id: str) -> Path:
    return folder / "answers" / f"{model_id}.jsonl"


def _ground_truth(release: Path) -> dict[tuple[str, str, str], str]:
    """``{(category, txt file name, question): answer}`` from the release's question/answer text files."""
    truth = {}
    for category in sorted(p for p in release.iterdir() if p.is_dir()):
        qa_dir = category / "questions_answers_YN" if (category / "images").is_dir() else category
        for txt in sorted(qa_dir.glob("*.txt")):
            for number, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                fields = line.strip().split("\t")
                if len(fields) != 2:
                    raise ValueError(f"{txt}:{number}: expected 'question<TAB>answer', got {line!r}")
                truth[(category.name, txt.name, fields[0])] = fields[1]
    return truth


def _evaluate(
    folder: Path, split: str, records: Sequence[Mapping[str, Any]], model_id: str, options: Options
) -> Result:
    release = folder / RELEASE
    if not release.is_dir():
        return Result({}, None, notes=[missing(release, "MME release")])
    truth = _ground_truth(release)
    rows: dict[str, list[tuple[str, str, str, str]]] = {}
    for r in records:
        category, file = str(r["question_id"]).split("/")[0], str(r["question_id"]).split("/")[-1].split(".")[0]
        file, prompt = file + ".txt", r["prompt"]
        if SHORT_ANSWER_TEXT in prompt:
            prompt = prompt.replace(SHORT_ANSWER_TEXT, "").strip()
        if YES_NO.strip() not in prompt:
            prompt += YES_NO
            if (category, file, prompt) not in truth:  # some release questions have two spaces before it
                prompt = prompt.replace(YES_NO, " " + YES_NO)
        if (category, file, prompt) not in truth:
            raise ValueError(f"MME: no ground truth for ({category!r}, {file!r}, {prompt!r}) in {release}")
        rows.setdefault(category, []).append((file, prompt, truth[(category, file, prompt)], r["text"]))
    files = []
    for category, lines in rows.items():
        out = folder / "eval_tool" / "answers" / model_id / f"{category}.txt"
        write_text_atomic(out, "".join("\t".join(line) + "\n" for line in lines))
        files.append(str(out))
    metrics = score_mme(
        {"category": c, "image": f, "ground_truth": gt, "prediction": p} for c, ls in rows.items() for f, _, gt, p in ls
    )
    notes = [] if metrics["perception"] is not None else ["not all 10 perception tasks present: no Perception total"]
    return Result(metrics, metrics["perception"], "perception", files, notes)


MME = Benchmark(
    name="mme",
    column="MME-P",
    folder="MME",
    default_split="llava_mme",
    max_new_tokens=128,
    load=_load,
    answers_path=_answers,
    evaluate=_evaluate,
)
