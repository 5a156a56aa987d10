"""The demo end to end on the seconds-scale settings: data -> vision tower -> stages -> checkpoint -> eval -> chat.

Also the reuse rules (a second run trains nothing; a changed stage-2 setting retrains stage 2 only) and the
``synthetic`` benchmark's scorer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from llava_stf.data.synthetic import BLANK_SPLIT, FAMILIES
from llava_stf.demo.__main__ import main
from llava_stf.demo.pipeline import FAST, run_pipeline
from llava_stf.eval.benchmarks import Options, get_benchmark
from llava_stf.eval.benchmarks.synthetic import score_synthetic
from llava_stf.generation import Generator, load_checkpoint
from llava_stf.serve.chat import ChatSession


def test_score_synthetic_normalises_and_splits_by_family() -> None:
    predictions = {"1": "Two.", "2": "Yes", "3": "a7", "4": "red circle"}
    answers = {"1": "2", "2": "yes", "3": "A7", "4": "red"}
    families = {"1": "count", "2": "existence", "3": "text", "4": "color"}
    m = score_synthetic(predictions, answers, families)
    assert m["accuracy"] == 75.0 and m["questions"] == 4
    assert (m["accuracy_count"], m["accuracy_color"], m["questions_text"]) == (100.0, 0.0, 1)
    with pytest.raises(KeyError, match="no ground truth"):
        score_synthetic({"9": "x"}, answers, families)


def test_synthetic_benchmark_names_missing_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="question file"):
        get_benchmark("synthetic").samples(tmp_path)


def test_synthetic_splits_keep_separate_answer_files(tmp_path) -> None:
    bench = get_benchmark("synthetic")
    real, blank = bench.answers_file(tmp_path, "m"), bench.answers_file(tmp_path, "m", Options(split=BLANK_SPLIT))
    assert real == tmp_path / "synthetic" / "eval" / "model_answers" / "m.jsonl"
    assert blank != real and blank.parent.name == BLANK_SPLIT


@pytest.mark.slow
def test_demo_pipeline_checkpoint_eval_chat_and_reuse(demo_out, capsys, monkeypatch) -> None:
    assert main(["--fast", "--out", str(demo_out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert all(f"[{i}/6]" in printed for i in range(1, 7))  # trained here, or reused from the comparison test
    for family in FAMILIES:
        assert f"    {family}" in printed
    assert "visual tokens per image: 16" in printed and "chat: USER 'What color is the" in printed

    run = demo_out / "mbtf_stf-seed0-fast"
    results = json.loads((demo_out / "results" / run.name / "results.json").read_text())
    metrics = results["benchmarks"]["synthetic/questions"]["metrics"]
    questions = (demo_out / "synthetic" / "eval" / "questions.jsonl").read_text().splitlines()
    assert metrics["questions"] == len(questions) == sum(metrics[f"questions_{f}"] for f in FAMILIES)
    answers = (demo_out / "synthetic" / "eval" / "model_answers" / f"{run.name}.jsonl").read_text().splitlines()
    assert len(answers) == len(questions)
    # The blank-image control of the same checkpoint: same questions, its own answers and results.
    assert "blank-image control" in printed and "(blank image" in printed
    blank = json.loads((demo_out / "results" / f"{run.name}-blank" / "results.json").read_text())
    assert blank["benchmarks"][f"synthetic/{BLANK_SPLIT}"]["split"] == BLANK_SPLIT
    assert blank["benchmarks"][f"synthetic/{BLANK_SPLIT}"]["metrics"]["questions"] == len(questions)
    blank_answers = demo_out / "synthetic" / "eval" / "model_answers" / BLANK_SPLIT / f"{run.name}-blank.jsonl"
    assert len(blank_answers.read_text().splitlines()) == len(questions)

    # The checkpoint is an ordinary one: the chat helper loads it and answers a text-only question.
    generator = Generator(*load_checkpoint(run / "stage2"))
    assert generator.template.name == "vicuna_v1"
    assert isinstance(ChatSession(generator).ask("How many shapes are there?"), str)

    # A second run reuses everything; a changed stage-2 setting retrains stage 2 only.
    again = run_pipeline(demo_out, FAST, name=run.name, progress=False)
    assert again.reused == {"stage1": True, "stage2": True} and again.metrics == metrics
    assert again.blank_metrics == blank["benchmarks"][f"synthetic/{BLANK_SPLIT}"]["metrics"]
    monkeypatch.chdir(demo_out.parent)  # the same folder named by a relative path is still the same run
    relative = run_pipeline(Path(demo_out.name), FAST, name=run.name, progress=False)
    assert relative.reused == {"stage1": True, "stage2": True}
    changed = run_pipeline(demo_out, dataclasses.replace(FAST, stage2_lr=5e-4), name=run.name, progress=False)
    assert changed.reused == {"stage1": True, "stage2": False}
