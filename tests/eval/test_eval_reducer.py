"""``python -m llava_stf.eval --reducer NAME [--tokens N | --reducer-kwargs JSON]`` on any checkpoint (issue 13).

The reducer and its settings name the model id and join the answers' provenance, so answers made with another reducer
or budget are never reused; ``--reducer none`` on a checkpoint without one changes nothing; every mistake is one
``error:`` line before any model loads. The session checkpoint is the tiny MBTF+STF one (16 image tokens, 2 layers).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_fixtures import make_gqa, make_pope, save_image, write_jsonl

import llava_stf.eval.__main__ as cli
from llava_stf.eval.answers import read_jsonl

QUESTIONS = [
    {"question_id": 1, "image": "a.png", "text": "What is shown?"},
    {"question_id": 2, "image": "b.png", "text": "What color is it?"},
    {"question_id": 3, "image": "a.png", "text": "How many?"},
]


def _files(root: Path) -> tuple[Path, Path]:
    save_image(root / "q" / "a.png", 1)
    save_image(root / "q" / "b.png", 2)
    write_jsonl(root / "q" / "questions.jsonl", QUESTIONS)
    write_jsonl(root / "q" / "truth.jsonl", [{"question_id": q["question_id"], "answer": "red"} for q in QUESTIONS])
    return root / "q" / "questions.jsonl", root / "q" / "truth.jsonl"


def _eval(root: Path, checkpoint: Path, *extra: str) -> int:
    questions, truth = _files(root)
    argv = ["--benchmark", "vqa", "--questions", str(questions), "--ground-truth", str(truth), "--model-path",
            str(checkpoint), "--data-root", str(root), "--no-progress", "--max-new-tokens", "2"]  # fmt: skip
    return cli.main([*argv, *extra])


def _answers(root: Path, model_id: str) -> Path:
    return root / "q" / "answers" / "questions" / f"{model_id}.jsonl"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_reducer_and_budget_name_the_model_id_and_the_provenance(tmp_path, checkpoint, model_id, capsys):
    assert _eval(tmp_path, checkpoint, "--reducer", "fastv", "--tokens", "8") == 0
    out = capsys.readouterr().out
    assert "fastv @ 8 tokens: k=2 r=0.5; 16 image tokens per image" in out  # FastV: keep 8 of 16 after layer 2
    reduced = f"{model_id}+fastv@8"
    assert len(read_jsonl(_answers(tmp_path, reduced))) == 3 and f"| {reduced} |" in out
    record = json.loads(_answers(tmp_path, reduced).with_suffix(".jsonl.provenance.json").read_text())
    assert record["reducer"] == {"type": "fastv", "kwargs": {"k": 2, "r": 0.5}} and record["reducer_tokens"] == 8
    results = json.loads((tmp_path / "results" / reduced / "results.json").read_text())
    assert results["reducer"] == {"type": "fastv", "kwargs": {"k": 2, "r": 0.5}}
    assert not _answers(tmp_path, model_id).exists()  # the checkpoint's own answers are another file


def test_answers_of_another_reducer_or_budget_are_never_reused(tmp_path, checkpoint, monkeypatch, capsys):
    assert _eval(tmp_path, checkpoint, "--model-id", "mine", "--reducer", "fastv", "--tokens", "8") == 0
    capsys.readouterr()
    monkeypatch.setattr(cli, "load_checkpoint", lambda *a, **k: pytest.fail("refused runs load no model"))
    assert _eval(tmp_path, checkpoint, "--model-id", "mine", "--reducer", "fastv", "--tokens", "4") == 1
    line = _error_line(capsys)
    assert 'reducer: recorded fastv {"k": 2, "r": 0.5}, now fastv {"k": 2, "r": 0.75}' in line
    assert _eval(tmp_path, checkpoint, "--model-id", "mine") == 1
    line = _error_line(capsys)
    assert "reducer: recorded fastv" in line and "now the checkpoint's own" in line
    monkeypatch.undo()
    assert _eval(tmp_path, checkpoint, "--model-id", "mine", "--reducer", "fastv", "--tokens", "8") == 0  # the same


def test_reducer_none_on_a_checkpoint_without_one_changes_nothing(tmp_path, checkpoint, model_id, capsys):
    assert _eval(tmp_path, checkpoint, "--reducer", "none", "--limit", "2") == 0
    assert "(as the checkpoint has it: no change)" in capsys.readouterr().out
    answers = _answers(tmp_path, f"{model_id}-first2")  # --limit N: the first N questions, its own model id
    assert [r["question_id"] for r in read_jsonl(answers)] == [1, 2]
    assert "reducer" not in json.loads(answers.with_suffix(".jsonl.provenance.json").read_text())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--reducer", "bogus"], "unknown reducer_type 'bogus'; valid reducer types: ['dart', "),
        (["--reducer", "prumerge", "--tokens", "8"], "reducer_type 'prumerge' has no token budget (its count is adap"),
        (["--reducer", "fastv", "--tokens", "17"], "token budget 17 for reducer_type 'fastv' must be an integer in 1."),
        (["--reducer", "fastv", "--tokens", "0"], "--tokens must be a positive number of image tokens, got 0"),
        (["--tokens", "8"], "--reducer-kwargs and --tokens go with --reducer NAME"),
        (["--reducer", "fastv", "--tokens", "8", "--reducer-kwargs", '{"k": 1}'], "give --tokens or --reducer-kwargs"),
        (["--reducer", "fastv", "--reducer-kwargs", "{k: 1"], "--reducer-kwargs must be a JSON object"),
        (["--reducer", "fastv", "--reducer-kwargs", '{"q": 1}'], "reducer_kwargs has unknown field(s) ['q']"),
        (["--reducer", "none", "--tokens", "8"], "--reducer none takes no --reducer-kwargs or --tokens"),
        (["--reducer", "prumerge"], "projector_type 'mbtf_stf' merges the 8x8 patch grid"),
    ],
)
def test_reducer_mistakes_are_one_line_before_loading(tmp_path, checkpoint, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(cli, "load_checkpoint", lambda *a, **k: pytest.fail("no model may be loaded"))
    assert _eval(tmp_path, checkpoint, *flags) == 1
    assert message in _error_line(capsys)


def test_limit_scores_the_questions_asked_on_official_layouts(tmp_path, checkpoint, model_id):
    """GQA and POPE score over every gold question; a --limit run is scored over the questions it asked."""
    make_gqa(tmp_path)
    make_pope(tmp_path)
    argv = ["--model-path", str(checkpoint), "--data-root", str(tmp_path), "--no-progress", "--max-new-tokens", "2"]
    assert cli.main(["--benchmark", "gqa", "pope", *argv, "--limit", "2"]) == 0
    results = json.loads((tmp_path / "results" / f"{model_id}-first2" / "results.json").read_text())
    scored = results["benchmarks"]
    assert results["limit"] == 2 and scored["gqa/llava_gqa_testdev_balanced"]["metrics"]["questions"] == 2
    assert list(scored["pope/llava_pope_test"]["metrics"]["splits"]) == ["adversarial"]
