"""Any question file is a benchmark (``--benchmark vqa --questions FILE``), and ``synthetic`` is a thin use of it.

The tiny model is untrained: after its run the answers are replaced by chosen texts (the provenance record stays)
and the rerun, which loads no model, must print the hand-computed score.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from eval_fixtures import save_image, write_jsonl

import llava_stf.eval.__main__ as cli
from llava_stf.eval.answers import parts_dir, read_jsonl
from llava_stf.eval.benchmarks import get_benchmark

QUESTIONS = [
    {"question_id": 1, "image": "cat.png", "text": "What animal is this?", "category": "animals"},
    {"question_id": 2, "image": "cat.png", "text": "How many cats are there?", "category": "count"},
    {"question_id": "q3", "image": "sub/dog.png", "text": "What animal is this?", "category": "animals"},
    {"question_id": 4, "image": "sub/dog.png", "text": "Is it sunny?"},
]
TRUTH = [
    {"question_id": 1, "answer": "cat"},
    {"question_id": "2", "answer": "two"},
    {"question_id": "q3", "answer": "Dog"},
    {"question_id": 4, "answer": "yes", "category": "weather"},
    {"question_id": 99, "answer": "not asked"},  # answers for questions not in the file are ignored
]


def _mine(root: Path) -> tuple[Path, Path, Path]:
    """A user's own question file, images in another folder, and a ground-truth file."""
    save_image(root / "pictures" / "cat.png", 1)
    save_image(root / "pictures" / "sub" / "dog.png", 2)
    write_jsonl(root / "mine" / "my_questions.jsonl", QUESTIONS)
    write_jsonl(root / "mine" / "truth.jsonl", TRUTH)
    return root / "mine" / "my_questions.jsonl", root / "pictures", root / "mine" / "truth.jsonl"


def _eval(root: Path, checkpoint: Path, *extra: str, benchmark: str = "vqa") -> int:
    argv = ["--benchmark", benchmark, "--model-path", str(checkpoint), "--data-root", str(root), "--no-progress"]
    return cli.main([*argv, "--max-new-tokens", "4", "--batch-size", "3", *extra])


def _replace_answers(path: Path, texts: list[str]) -> None:
    records = read_jsonl(path)
    shutil.rmtree(parts_dir(path))
    path.write_text("".join(json.dumps({**r, "text": t}) + "\n" for r, t in zip(records, texts, strict=True)))


def test_own_question_file_is_answered_scored_and_printed(tmp_path, checkpoint, model_id, capsys) -> None:
    questions, images, truth = _mine(tmp_path)
    own = ["--questions", str(questions), "--image-folder", str(images), "--ground-truth", str(truth)]
    assert _eval(tmp_path, checkpoint, *own) == 0
    answers = tmp_path / "mine" / "answers" / "my_questions" / f"{model_id}.jsonl"
    assert [r["question_id"] for r in read_jsonl(answers)] == [1, 2, "q3", 4]
    _replace_answers(answers, ["A cat.", "2", "cat", "Yes"])
    capsys.readouterr()
    assert _eval(tmp_path, checkpoint, *own) == 0
    out = capsys.readouterr().out
    assert "vqa: accuracy 75.0% of 4 questions (animals 50.0%, count 100.0%, weather 100.0%)" in out
    header, _, row = out.splitlines()[-3:]
    assert header.endswith("| MME-P | VQA (mine/my_questions) |") and row.endswith("| — | 75.0 |")
    entry = json.loads((tmp_path / "results" / model_id / "results.json").read_text())["benchmarks"]
    assert entry[f"vqa/{questions.resolve()}"]["metrics"]["accuracy_animals"] == 50.0


def test_two_question_files_of_one_name_keep_their_own_answers_and_results(tmp_path, checkpoint, model_id, capsys):
    questions, images, _ = _mine(tmp_path)
    other = tmp_path / "other" / questions.name
    shutil.copytree(questions.parent, other.parent)
    write_jsonl(other, QUESTIONS[:2])
    for path in (questions, other):
        assert _eval(tmp_path, checkpoint, "--questions", str(path), "--image-folder", str(images)) == 0
        assert len(read_jsonl(path.parent / "answers" / path.stem / f"{model_id}.jsonl")) == len(read_jsonl(path))
    results = json.loads((tmp_path / "results" / model_id / "results.json").read_text())["benchmarks"]
    assert sorted(results) == [f"vqa/{questions.resolve()}", f"vqa/{other.resolve()}"]
    assert {e["column"] for e in results.values()} == {"VQA (mine/my_questions)", "VQA (other/my_questions)"}


def test_without_ground_truth_it_answers_only(tmp_path, checkpoint, capsys) -> None:
    questions, images, _ = _mine(tmp_path)
    assert _eval(tmp_path, checkpoint, "--questions", str(questions), "--image-folder", str(images)) == 0
    assert "vqa: no ground truth given (--ground-truth FILE): answers only, no score" in capsys.readouterr().out


def test_bad_ground_truth_is_one_error_before_loading(tmp_path, checkpoint, monkeypatch, capsys) -> None:
    questions, images, truth = _mine(tmp_path)
    write_jsonl(truth, [TRUTH[0], {"question_id": "1", "answer": "kitten"}, TRUTH[2]])
    monkeypatch.setattr(cli, "load_checkpoint", lambda *a, **k: pytest.fail("no model may be loaded"))
    argv = ["--questions", str(questions), "--image-folder", str(images), "--ground-truth", str(truth)]
    assert _eval(tmp_path, checkpoint, *argv) == 1
    err = capsys.readouterr().err
    assert err == f"error: {truth}: 1 problem(s): question_id 1 and '1' repeated on lines 1, 2\n"
    write_jsonl(truth, TRUTH[:3])
    assert _eval(tmp_path, checkpoint, *argv) == 1
    assert capsys.readouterr().err == f"error: {truth}: no answer for 1 question(s), e.g. ids [4]\n"


def test_own_files_go_with_vqa_only(tmp_path, checkpoint, capsys) -> None:
    questions, _, _ = _mine(tmp_path)
    assert _eval(tmp_path, checkpoint, "--questions", str(questions), benchmark="pope") == 1
    assert capsys.readouterr().err == "error: --questions only go with --benchmark vqa, not pope\n"
    assert _eval(tmp_path, checkpoint) == 1
    assert capsys.readouterr().err == "error: --benchmark vqa needs --questions FILE (LLaVA question JSONL)\n"
    assert _eval(tmp_path, checkpoint, "--questions", str(tmp_path / "nope.jsonl")) == 1
    assert capsys.readouterr().err == f"error: --questions {tmp_path / 'nope.jsonl'}: no such file\n"


def _synthetic(root: Path) -> None:
    """The layout ``llava_stf.data.synthetic`` writes, with a blank-image control split."""
    folder = root / "synthetic"
    save_image(folder / "images" / "0.png", 0)
    save_image(folder / "images" / "blank.png", 1)
    for split, image in (("", "images/0.png"), ("_blank", "images/blank.png")):
        rows = [{"question_id": f"0_{k}", "image": image, "text": f"Q{k}?", "category": c}
                for k, c in enumerate(["color", "count"])]  # fmt: skip
        write_jsonl(folder / "eval" / f"questions{split}.jsonl", rows)
        truth = [{"question_id": "0_0", "answer": "red", "family": "color"}]
        write_jsonl(folder / "eval" / f"answers{split}.jsonl", truth + [{"question_id": "0_1", "answer": "2"}])


def test_synthetic_splits_keep_separate_results_and_columns(tmp_path, checkpoint, model_id, capsys) -> None:
    _synthetic(tmp_path)
    bench = get_benchmark("synthetic")
    assert _eval(tmp_path, checkpoint, benchmark="synthetic") == 0
    assert _eval(tmp_path, checkpoint, "--split", "questions_blank", benchmark="synthetic") == 0
    results = json.loads((tmp_path / "results" / model_id / "results.json").read_text())["benchmarks"]
    assert set(results) == {"synthetic/questions", "synthetic/questions_blank"}
    assert results["synthetic/questions"]["metrics"]["questions_color"] == 1
    header = capsys.readouterr().out.splitlines()[-3]
    assert header.endswith("| MME-P | Synth | Synth (questions_blank) |")
    assert bench.answers_file(tmp_path, model_id).is_file()


def test_synthetic_ground_truth_gap_is_an_error_before_loading(tmp_path, checkpoint, monkeypatch, capsys) -> None:
    _synthetic(tmp_path)
    write_jsonl(tmp_path / "synthetic" / "eval" / "answers.jsonl", [{"question_id": "0_0", "answer": "red"}])
    monkeypatch.setattr(cli, "load_checkpoint", lambda *a, **k: pytest.fail("no model may be loaded"))
    assert _eval(tmp_path, checkpoint, benchmark="synthetic") == 1
    assert "answers.jsonl: no answer for 1 question(s), e.g. ids ['0_1']" in capsys.readouterr().err


def test_score_exact_match_without_categories() -> None:
    from llava_stf.eval.scoring import score_exact_match

    metrics = score_exact_match({"1": "Two.", "2": "the cat"}, {"1": "2", "2": "cat", "3": "x"})
    assert metrics == {"accuracy": 100.0, "questions": 2}
