"""Nothing silently wrong (issue 12): answers are reused only for the same checkpoint, questions and settings; bad
input is one ``error:`` line before any model loads; ``--overwrite`` deletes nothing until the new run is checked.

Every test here drives ``python -m llava_stf.eval`` in process and looks only at what a user sees (exit status,
stderr, files), so each also states the behaviour before the fix: there, each of them fails.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from eval_fixtures import MMBENCH_COLUMNS, make_mmbench, make_pope, make_vizwiz, save_image, write_jsonl

import llava_stf.eval.__main__ as cli
from llava_stf.eval.answers import parts_dir, read_jsonl
from llava_stf.provenance import checkpoint_digest, file_digest
from llava_stf.testing import save_tiny_checkpoint


@pytest.fixture(scope="module")
def two_stage2(tmp_path_factory) -> tuple[Path, Path]:
    """Two different checkpoints (seeds 0 and 1) in two folders both named ``stage2``, as two training runs leave."""
    root = tmp_path_factory.mktemp("runs")
    return tuple(save_tiny_checkpoint(root / run / "stage2", seed=seed) for seed, run in enumerate(["run-a", "run-b"]))


def _eval(root: Path, checkpoint: Path, *extra: str, benchmark: str = "pope") -> int:
    argv = ["--benchmark", benchmark, "--model-path", str(checkpoint), "--data-root", str(root), "--no-progress"]
    return cli.main([*argv, "--max-new-tokens", "4", *extra])


def _no_model(*args, **kwargs):
    raise AssertionError("no model may be loaded here")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_two_checkpoints_both_named_stage2_evaluated_in_turn(tmp_path, two_stage2, capsys) -> None:
    a, b = two_stage2
    make_pope(tmp_path)
    assert _eval(tmp_path, a) == 0 and _eval(tmp_path, b) == 0
    files = sorted((tmp_path / "pope" / "answers").glob("*.jsonl"))
    assert [f.name.split("-")[0] for f in files] == ["stage2", "stage2"]  # one answers file per checkpoint
    texts = [[r["text"] for r in read_jsonl(f)] for f in files]
    assert texts[0] != texts[1]  # the second model answered itself, not reused the first one's answers
    results = sorted((tmp_path / "results").glob("*/results.json"))
    digests = {json.loads(r.read_text())["model_digest"] for r in results}
    assert len(results) == 2 and digests == {checkpoint_digest(a), checkpoint_digest(b)}
    out = capsys.readouterr().out
    assert all(f"| {r.parent.name} |" in out for r in results)


def test_same_model_id_for_another_checkpoint_is_refused(tmp_path, two_stage2, monkeypatch, capsys) -> None:
    a, b = two_stage2
    make_pope(tmp_path)
    assert _eval(tmp_path, a, "--model-id", "mine") == 0
    answers = tmp_path / "pope" / "answers" / "mine.jsonl"
    before = answers.read_bytes()
    monkeypatch.setattr(cli, "load_checkpoint", _no_model)
    assert _eval(tmp_path, b, "--model-id", "mine") == 1
    line = _error_line(capsys)
    assert (
        "pope: the answers in" in line
        and "differ from this run in checkpoint: recorded" in line
        and "--overwrite" in line
    )
    assert answers.read_bytes() == before


def test_edited_question_file_is_refused_then_answered_again_with_overwrite(tmp_path, checkpoint, capsys) -> None:
    questions = make_vizwiz(tmp_path)
    assert _eval(tmp_path, checkpoint, benchmark="vizwiz") == 0
    questions[1]["text"] = "What colour is this coat?"
    write_jsonl(tmp_path / "vizwiz" / "llava_test.jsonl", questions)
    capsys.readouterr()
    assert _eval(tmp_path, checkpoint, benchmark="vizwiz") == 1
    assert "differ from this run in questions: recorded" in _error_line(capsys)
    assert _eval(tmp_path, checkpoint, "--overwrite", benchmark="vizwiz") == 0
    [answers] = (tmp_path / "vizwiz" / "answers").glob("*.jsonl")
    assert read_jsonl(answers)[1]["prompt"] == "What colour is this coat?"


def test_changed_max_new_tokens_is_refused(tmp_path, checkpoint, monkeypatch, capsys) -> None:
    make_pope(tmp_path)
    assert _eval(tmp_path, checkpoint) == 0
    monkeypatch.setattr(cli, "load_checkpoint", _no_model)
    capsys.readouterr()
    assert _eval(tmp_path, checkpoint, "--max-new-tokens", "9") == 1
    assert "differ from this run in generation settings: max_new_tokens 4 -> 9" in _error_line(capsys)


def test_duplicate_ids_malformed_lines_and_missing_fields_are_one_error_before_loading(
    tmp_path, checkpoint, monkeypatch, capsys
) -> None:
    folder = tmp_path / "vizwiz"
    save_image(folder / "test" / "a.jpg", 0)
    rows = [
        {"question_id": 7, "image": "a.jpg", "text": "What is it?"},
        {"question_id": "7", "image": "a.jpg", "text": "What color?"},
        {"question_id": 8, "text": "No image field?"},
    ]
    (folder / "llava_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"question_id": 9,\n')
    monkeypatch.setattr(cli, "load_checkpoint", _no_model)
    assert _eval(tmp_path, checkpoint, benchmark="vizwiz") == 1
    line = _error_line(capsys)
    assert line.startswith(f"error: {folder / 'llava_test.jsonl'}: 3 problem(s): ")
    assert "line 3: lacks 'image'" in line and "line 4: not a JSON line" in line
    assert "question_id 7 and '7' repeated on lines 1, 2" in line
    assert not (folder / "answers").exists()


@pytest.mark.parametrize("damage", ["missing", "corrupt", "truncated", "too_elongated"])
def test_bad_images_are_one_error_naming_the_file_before_loading(
    tmp_path, checkpoint, monkeypatch, capsys, damage
) -> None:
    questions = make_pope(tmp_path)
    image = tmp_path / "pope" / "val2014" / questions[0]["image"]
    if damage == "missing":
        image.unlink()
    elif damage == "corrupt":
        image.write_bytes(b"not an image at all")
    elif damage == "truncated":
        image.write_bytes(image.read_bytes()[:200])
    else:  # 1 x 60 pixels: beyond the aspect-ratio limit training and chat apply (ImageLimits)
        save_image(image, 0, (60, 1))
    monkeypatch.setattr(cli, "load_checkpoint", _no_model)
    assert _eval(tmp_path, checkpoint) == 1
    line = _error_line(capsys)
    assert "1 image(s) of unanswered questions cannot be used" in line and str(image) in line
    reason = {"missing": "missing_image", "corrupt": "unreadable_image", "too_elongated": "image_too_large"}
    assert reason.get(damage, "_image") in line
    assert not (tmp_path / "pope" / "answers").exists()


def test_image_limits_are_the_shared_policy_and_flags_change_them(tmp_path, checkpoint, monkeypatch, capsys) -> None:
    questions = make_pope(tmp_path)
    save_image(tmp_path / "pope" / "val2014" / questions[0]["image"], 0, (60, 1))  # aspect ratio 60 > 50
    monkeypatch.setattr(cli, "load_checkpoint", _no_model)
    assert _eval(tmp_path, checkpoint, "--max-image-bytes", "100", "--max-aspect-ratio", "100") == 1
    line = _error_line(capsys)  # the elongated image passes now; every image is over 100 bytes
    assert line.startswith("error: 3 image(s)") and "bytes > 100 bytes" in line and "aspect ratio" not in line
    assert _eval(tmp_path, checkpoint, "--max-aspect-ratio", "0.5") == 1
    assert "max_aspect_ratio" in _error_line(capsys)


def test_bad_inline_image_names_its_question_before_loading(tmp_path, checkpoint, monkeypatch, capsys) -> None:
    make_mmbench(tmp_path)
    tsv = tmp_path / "mmbench" / "mmbench_dev_20230712.tsv"
    lines = tsv.read_text().splitlines()
    cells = lines[2].split("\t")
    cells[MMBENCH_COLUMNS.index("image")] = "bm90IGFuIGltYWdl"  # base64 of "not an image"
    tsv.write_text("\n".join([*lines[:2], "\t".join(cells), *lines[3:]]) + "\n")
    monkeypatch.setattr(cli, "load_checkpoint", _no_model)
    assert _eval(tmp_path, checkpoint, benchmark="mmbench") == 1
    line = _error_line(capsys)
    assert "1 image(s)" in line and "question 1: unreadable_image: the inline image is not a readable image" in line


def test_overwrite_with_a_bad_checkpoint_keeps_the_answers(tmp_path, checkpoint, model_id, capsys) -> None:
    make_pope(tmp_path)
    assert _eval(tmp_path, checkpoint) == 0
    answers = tmp_path / "pope" / "answers" / f"{model_id}.jsonl"
    saved = {p: p.read_bytes() for p in [answers, *parts_dir(answers).iterdir()]}
    capsys.readouterr()
    assert _eval(tmp_path, tmp_path / "no-such-checkpoint", "--model-id", model_id, "--overwrite") == 1
    assert "checkpoint folder not found" in _error_line(capsys)
    broken = tmp_path / "broken"  # passes the folder check, fails to load: still nothing deleted
    shutil.copytree(checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 64)
    assert _eval(tmp_path, broken, "--model-id", model_id, "--overwrite") == 1
    _error_line(capsys)
    assert {p: p.read_bytes() for p in saved} == saved


def test_answers_without_a_record_are_refused_unless_adopted(tmp_path, checkpoint, model_id, capsys) -> None:
    questions = make_pope(tmp_path)
    answers = tmp_path / "pope" / "answers" / f"{model_id}.jsonl"  # as upstream LLaVA writes them: no record
    write_jsonl(answers, [{"question_id": q["question_id"], "prompt": q["text"], "text": "Yes"} for q in questions])
    assert _eval(tmp_path, checkpoint) == 1
    assert "holds answers with no provenance record" in _error_line(capsys) and answers.is_file()
    assert _eval(tmp_path, checkpoint, "--adopt-answers") == 0
    results = json.loads((tmp_path / "results" / model_id / "results.json").read_text())
    entry = results["benchmarks"]["pope/llava_pope_test"]
    assert entry["provenance"]["adopted"] is True and entry["metrics"]["splits"]["random"]["tp"] == 1


def test_answers_and_results_record_their_provenance(tmp_path, checkpoint, model_id) -> None:
    make_pope(tmp_path)
    assert _eval(tmp_path, checkpoint, "--dtype", "float32") == 0
    answers = tmp_path / "pope" / "answers" / f"{model_id}.jsonl"
    assert set(read_jsonl(answers)[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    record = json.loads(answers.with_name(answers.name + ".provenance.json").read_text())
    assert record["checkpoint"]["digest"] == checkpoint_digest(checkpoint)
    assert record["questions"]["digest"] == file_digest(tmp_path / "pope" / "llava_pope_test.jsonl")
    assert record["generation"] == {
        "max_new_tokens": 4, "min_new_tokens": 0, "temperature": 0.0, "top_p": None, "dtype": "float32"
    }  # fmt: skip
    results = json.loads((tmp_path / "results" / model_id / "results.json").read_text())
    assert results["benchmarks"]["pope/llava_pope_test"]["provenance"] == record


def test_another_checkpoint_under_one_id_supersedes_the_earlier_results(tmp_path, two_stage2, capsys) -> None:
    a, b = two_stage2
    make_pope(tmp_path)
    assert _eval(tmp_path, a, "--model-id", "mine") == 0
    assert _eval(tmp_path, b, "--model-id", "mine", "--overwrite") == 0
    results = json.loads((tmp_path / "results" / "mine" / "results.json").read_text())
    assert results["model_digest"] == checkpoint_digest(b)
    digests = {e["provenance"]["checkpoint"]["digest"] for e in results["benchmarks"].values()}
    assert digests == {results["model_digest"]}
    assert list(results["superseded"]) == [checkpoint_digest(a)]


def test_debug_shows_the_traceback(tmp_path, checkpoint) -> None:
    with pytest.raises(FileNotFoundError, match="question file not found"):
        _eval(tmp_path, checkpoint, "--debug")


def test_checkpoint_digest_covers_weights_config_and_processor_only(tmp_path, checkpoint) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    digest = checkpoint_digest(copy)
    assert digest == checkpoint_digest(checkpoint)  # contents, not the folder
    (copy / "trainer_state.json").write_text("{}")  # training leftovers do not count
    assert checkpoint_digest(copy) == digest
    for name in ("tokenizer_config.json", "config.json", "model.safetensors"):
        data = (copy / name).read_bytes()
        (copy / name).write_bytes(data + b" ")  # one more byte: another checkpoint
        assert checkpoint_digest(copy) != digest, name
        (copy / name).write_bytes(data)
    assert checkpoint_digest(copy) == digest
