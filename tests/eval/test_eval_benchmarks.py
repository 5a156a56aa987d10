"""Each benchmark end to end on a 3-5 question fixture in LLaVA's layout: prompts -> engine -> answers -> score or
submission. The tiny model is untrained, so after the model's run its answers are replaced by chosen texts and the
rerun (which loads no model) must give the hand-computed scores and upload files.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path
from xml.etree import ElementTree

import pytest
from eval_fixtures import (
    make_gqa,
    make_mmbench,
    make_mme,
    make_pope,
    make_sqa,
    make_textvqa,
    make_vizwiz,
    make_vqav2,
)

from llava_stf.eval.__main__ import main
from llava_stf.eval.answers import parts_dir, read_jsonl
from llava_stf.eval.benchmarks import BENCHMARKS, Options, get_benchmark

MODEL_ID = ""  # the tiny checkpoint's default id (folder name + digest), set by the autouse fixture below


@pytest.fixture(autouse=True)
def _model_id(model_id, monkeypatch) -> None:
    monkeypatch.setattr(f"{__name__}.MODEL_ID", model_id)


def run(benchmark: str, checkpoint: Path, root: Path, *extra: str) -> dict:
    """``python -m llava_stf.eval`` in process (errors raised: ``--debug``); this benchmark's results entry or {}."""
    argv = ["--benchmark", benchmark, "--model-path", str(checkpoint), "--data-root", str(root), "--debug"]
    assert main([*argv, "--batch-size", "4", "--max-new-tokens", "4", "--no-progress", *extra]) == 0
    results = root / "results" / MODEL_ID / "results.json"
    split = next((v for k, v in zip(extra, extra[1:]) if k == "--split"), get_benchmark(benchmark).default_split)
    return json.loads(results.read_text())["benchmarks"].get(f"{benchmark}/{split}", {}) if results.is_file() else {}


def answers_file(benchmark: str, root: Path, **options) -> Path:
    return get_benchmark(benchmark).answers_file(root, MODEL_ID, Options(**options))


def replace_answers(path: Path, texts: list[str]) -> list[dict]:
    """Turn the model's answers into an upstream-style file holding ``texts`` (no part files)."""
    records = read_jsonl(path)
    assert len(records) == len(texts)
    shutil.rmtree(parts_dir(path))
    rows = [{**r, "text": t} for r, t in zip(records, texts)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def model_run(benchmark: str, checkpoint: Path, root: Path, questions: int, **options) -> list[dict]:
    """Run the model; check one answer per question, in order, with upstream's fields."""
    run(benchmark, checkpoint, root, *(["--all-rounds"] if options.get("all_rounds") else []))
    records = read_jsonl(answers_file(benchmark, root, **options))
    assert len(records) == questions
    assert all({"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(r) for r in records)
    assert all(r["model_id"] == MODEL_ID for r in records)
    return records


def test_registry_has_the_nine_benchmarks() -> None:
    assert list(BENCHMARKS) == [
        "gqa", "sqa", "textvqa", "pope", "mmbench", "mmbench_cn", "vqav2", "vizwiz", "mme", "synthetic", "vqa"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown benchmark 'coco'; valid benchmarks: gqa, sqa"):
        get_benchmark("coco")


def test_gqa(tmp_path, checkpoint) -> None:
    questions = make_gqa(tmp_path)
    records = model_run("gqa", checkpoint, tmp_path, 3)
    assert [r["prompt"] for r in records] == [q["text"] for q in questions]
    replace_answers(answers_file("gqa", tmp_path), ["No.", "Woman", "no"])
    entry = run("gqa", checkpoint, tmp_path)
    assert entry["headline"] == pytest.approx(200 / 3)  # the unbalanced gold question is not counted
    predictions = json.loads((tmp_path / "gqa" / "data" / "testdev_balanced_predictions.json").read_text())
    assert predictions[0] == {"questionId": "201307251", "prediction": "no"}


def test_sqa(tmp_path, checkpoint) -> None:
    make_sqa(tmp_path)
    records = model_run("sqa", checkpoint, tmp_path, 3)
    suffix = "\nAnswer with the option's letter from the given choices directly."
    assert records[0]["prompt"] == (
        "<image>\nContext: Select the best answer.\nWhich animal is a mammal?\nA. shark\nB. whale" + suffix
    )
    assert records[1]["prompt"] == "Which is a verb?\nA. run\nB. blue\nC. cat" + suffix  # text only: no tag
    replace_answers(answers_file("sqa", tmp_path), ["B", "A. run", "The answer is B."])
    entry = run("sqa", checkpoint, tmp_path)
    assert entry["metrics"]["accuracy"] == pytest.approx(200 / 3)
    assert entry["headline"] == pytest.approx(50.0)  # IMG-Accuracy: problems 4 (right) and 9 (wrong)


def test_textvqa(tmp_path, checkpoint) -> None:
    make_textvqa(tmp_path)
    model_run("textvqa", checkpoint, tmp_path, 3)  # two questions share an image id: both answered
    replace_answers(answers_file("textvqa", tmp_path), ["Nikon", "coolpix", "10"])
    # 10 of 10 annotators -> 1.0; 2 -> 0.6; "ten" normalises to "10", 1 annotator -> 0.3
    assert run("textvqa", checkpoint, tmp_path)["headline"] == pytest.approx(100 * 1.9 / 3)


def test_pope(tmp_path, checkpoint) -> None:
    make_pope(tmp_path)
    model_run("pope", checkpoint, tmp_path, 5)
    answers = ["Yes, there is a snowboard.", "No, there is not.", "No", "Yes", "There is a car."]
    replace_answers(answers_file("pope", tmp_path), answers)
    entry = run("pope", checkpoint, tmp_path)
    splits = entry["metrics"]["splits"]
    assert splits["adversarial"]["f1"] == pytest.approx(100.0)
    assert splits["popular"]["f1"] == 0.0 and splits["popular"]["fn"] == 1
    assert splits["random"]["f1"] == pytest.approx(200 / 3)  # precision 1/2, recall 1
    assert entry["headline"] == pytest.approx((100 + 0 + 200 / 3) / 3)


def _sheet(path: Path) -> list[list[str]]:
    ns = {"s": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
    with zipfile.ZipFile(path) as archive:
        root = ElementTree.fromstring(archive.read("xl/worksheets/sheet1.xml"))
    rows = []
    for row in root.iterfind(".//s:row", ns):
        cells = {}
        for cell in row.iterfind("s:c", ns):
            column = re.match(r"[A-Z]+", cell.get("r")).group()
            cells[column] = "".join(t.text or "" for t in cell.iter(f"{{{ns['s']}}}t")) or cell.findtext("s:v", "", ns)
        rows.append([cells.get(c, "") for c in "ABCDEFGHI"])
    return rows


@pytest.mark.parametrize(
    ("name", "folder", "split"),
    [
        ("mmbench", "mmbench", "mmbench_dev_20230712"),
        ("mmbench_cn", "mmbench_cn", "mmbench_dev_cn_20231003"),
    ],
)
def test_mmbench_one_round_and_upload(tmp_path, checkpoint, name, folder, split) -> None:
    make_mmbench(tmp_path, folder, split)
    records = model_run(name, checkpoint, tmp_path, 3)
    assert records[0]["prompt"] == "What is the main color?\nA. red\nB. green\nC. blue"  # hint "nan", D "nan"
    assert records[1]["prompt"] == "Look closely.\nHow many dogs?\nA. one\nB. two"
    assert records[1]["options"] == ["one", "two"] and records[1]["option_char"] == ["A", "B"]
    replace_answers(answers_file(name, tmp_path), ["C", "B. two", "The answer is D"])
    entry = run(name, checkpoint, tmp_path)
    assert entry["headline_metric"] == "round0_accuracy" and entry["headline"] == pytest.approx(200 / 3)
    sheet = _sheet(tmp_path / folder / "answers_upload" / split / f"{MODEL_ID}.xlsx")
    assert sheet[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert sheet[2] == ["1", "How many dogs?", "one", "two", "", "", "B. two", "A", "dev"]


def test_mmbench_test_split_gets_an_upload_only(tmp_path, checkpoint) -> None:
    make_mmbench(tmp_path, split="mmbench_test_20230712", answers=False)
    entry = run("mmbench", checkpoint, tmp_path, "--split", "mmbench_test_20230712")
    assert entry["headline"] is None and "no answer column" in entry["notes"][-1]
    upload = tmp_path / "mmbench" / "answers_upload" / "mmbench_test_20230712" / f"{MODEL_ID}.xlsx"
    assert _sheet(upload)[0][:8] == ["index", "question", "A", "B", "C", "D", "prediction", "split"]


def test_mmbench_all_rounds_circular(tmp_path, checkpoint) -> None:
    rows = make_mmbench(tmp_path)
    records = model_run("mmbench", checkpoint, tmp_path, 3 + 2 + 4, all_rounds=True)
    assert records[1]["prompt"] == "What is the main color?\nA. green\nB. blue\nC. red"  # round 1 rotates
    answers = []
    for record in records:  # right everywhere, except question 1 in round 1
        row = rows[record["question_id"]]
        right = re.search(rf"\n([A-D])\. {row[row['answer']]}(\n|$)", record["prompt"]).group(1)
        wrong = "A" if right == "B" else "B"
        answers.append(wrong if (record["question_id"], record["round_id"]) == (1, 1) else right)
    replace_answers(answers_file("mmbench", tmp_path, all_rounds=True), answers)
    entry = run("mmbench", checkpoint, tmp_path, "--all-rounds")
    assert entry["headline_metric"] == "circular_accuracy" and entry["headline"] == pytest.approx(200 / 3)
    assert entry["metrics"]["round0_accuracy"] == pytest.approx(100.0)


def test_vqav2_upload(tmp_path, checkpoint) -> None:
    make_vqav2(tmp_path)
    model_run("vqav2", checkpoint, tmp_path, 3)
    replace_answers(answers_file("vqav2", tmp_path), ["Playing Tennis!", "two", "yes."])
    entry = run("vqav2", checkpoint, tmp_path)
    assert entry["headline"] is None and "EvalAI" in entry["notes"][0]
    upload = tmp_path / "vqav2" / "answers_upload" / "llava_vqav2_mscoco_test-dev2015" / f"{MODEL_ID}.json"
    assert json.loads(upload.read_text()) == [  # every test2015 id, in its order; "" outside test-dev
        {"question_id": 262144000, "answer": "playing tennis"},
        {"question_id": 100, "answer": ""},
        {"question_id": 262144001, "answer": "2"},
        {"question_id": 262145000, "answer": "yes"},
    ]


def test_vizwiz_upload(tmp_path, checkpoint) -> None:
    questions = make_vizwiz(tmp_path)
    model_run("vizwiz", checkpoint, tmp_path, 3)
    replace_answers(answers_file("vizwiz", tmp_path), ["Unanswerable", "Dark Blue.", "a can of soup"])
    run("vizwiz", checkpoint, tmp_path)
    upload = json.loads((tmp_path / "vizwiz" / "answers_upload" / f"{MODEL_ID}.json").read_text())
    assert upload == [
        {"image": questions[0]["image"], "answer": "unanswerable"},
        {"image": questions[1]["image"], "answer": "dark blue"},
        {"image": questions[2]["image"], "answer": "can of soup"},
    ]


def test_mme(tmp_path, checkpoint) -> None:
    make_mme(tmp_path)
    model_run("mme", checkpoint, tmp_path, 4)  # two questions per image share a question id
    replace_answers(answers_file("mme", tmp_path), ["Yes", "No, there is none", "No", "no"])
    entry = run("mme", checkpoint, tmp_path)
    tasks = entry["metrics"]["tasks"]
    assert tasks["existence"]["score"] == pytest.approx(200.0)
    assert tasks["artwork"]["score"] == pytest.approx(50.0)  # acc 1/2, acc+ 0
    assert entry["headline"] is None  # 2 of the 10 perception tasks: no total
    converted = (tmp_path / "MME" / "eval_tool" / "answers" / MODEL_ID / "artwork.txt").read_text().splitlines()
    assert converted[1] == "10002.txt\tIs this artwork created by Monet?  Please answer yes or no.\tNo\tno"


def test_missing_ground_truth_is_a_note_not_a_crash(tmp_path, checkpoint) -> None:
    make_textvqa(tmp_path)
    (tmp_path / "textvqa" / "TextVQA_0.5.1_val.json").unlink()
    entry = run("textvqa", checkpoint, tmp_path)
    assert entry["headline"] is None and "TextVQA annotations not found" in entry["notes"][0]
    assert len(read_jsonl(answers_file("textvqa", tmp_path))) == 3


def test_missing_question_file_says_where_it_should_be(tmp_path, checkpoint) -> None:
    with pytest.raises(FileNotFoundError, match=r"question file not found: .*pope/llava_pope_test.jsonl"):
        run("pope", checkpoint, tmp_path)
