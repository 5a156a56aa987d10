"""``python -m llava_stf.bench.serve_random``: random-weight ``mlp2x_gelu`` and ``mbtf_stf`` checkpoints at a
benchmark size, saved with a word-level tokenizer over the whole vocabulary, served and load-tested; and
``bench.serve --no-answer-check``, which it relies on."""

from __future__ import annotations

import json

import pytest

from llava_stf.bench import serve, serve_random
from llava_stf.bench.serve_load import Level, Outcome
from llava_stf.bench.serve_report import Run


def test_word_tokenizer_covers_the_vocabulary_with_the_image_token_at_its_id() -> None:
    tok = serve_random.word_tokenizer(120, 100)
    assert len(tok) == 120 and tok.convert_tokens_to_ids("<image>") == 100
    ids = tok("USER: <image>\nWhat is shown in the image? ASSISTANT:")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1 and ids.count(100) == 1 and tok.unk_token_id not in ids
    assert tok.decode([77, 119], skip_special_tokens=True) == "w77 w119"  # any id a random model picks is a word
    assert tok.eos_token_id == 2 and tok.pad_token_id == tok.unk_token_id == 0
    with pytest.raises(ValueError, match="image token id 120 must be in"):
        serve_random.word_tokenizer(120, 120)


@pytest.mark.slow
def test_random_checkpoints_are_served_and_load_tested(tmp_path) -> None:
    argv = ["--size", "tiny", "--device", "cpu", "--requests", "4", "--levels", "1", "2", "--max-tokens", "3"]
    assert serve_random.main([*argv, "--work", str(tmp_path), "--json", str(tmp_path / "out.json")]) == 0
    record = json.loads((tmp_path / "out.json").read_text())
    runs = record["runs"]
    assert [r["projector"] for r in runs] == ["mlp2x_gelu", "mbtf_stf"]
    assert [r["image_tokens"] for r in runs] == [64, 16]  # tiny: 32-px images, 4-px patches; STF fuses 2x2
    assert runs[0]["prompt_tokens"] - 64 == runs[1]["prompt_tokens"] - 16  # the same words around the image
    assert all(level["errors"] == 0 and level["one_answer_each"] for r in runs for level in r["levels"])
    assert any("LLM prompt tokens per request" in line for line in record["ceilings"])
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # the checkpoints' temporary folder is gone


def test_no_answer_check_reports_answers_that_change_with_the_level(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "config.json").write_text("{}")

    def measure(path, args, questions) -> Run:  # every request answered, but not the same at each level
        levels = [Level(c, [Outcome(0, answers=1)], seconds=1.0) for c in (1, 2)]
        return Run(path, "m", "mlp2x_gelu", levels, False)

    monkeypatch.setattr(serve, "measure", measure)
    argv = ["--model-path", str(tmp_path), "--levels", "1", "2"]
    assert serve.run(serve.build_parser().parse_args(argv)) == 1
    assert serve.run(serve.build_parser().parse_args([*argv, "--no-answer-check"])) == 0
    assert "m: answers identical at every level: NO" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [(["--requests", "0"], "--levels, --requests and --max-tokens must be >= 1"),
     (["--device", "cuda:0"], "--device must be cpu or cuda")],
)  # fmt: skip
def test_bad_arguments_are_one_error_line_before_anything_is_built(tmp_path, capsys, monkeypatch, argv, message):
    def build(*_):
        raise AssertionError("checkpoints built before the arguments were checked")

    monkeypatch.setattr(serve_random, "save_checkpoints", build)
    assert serve_random.main([*argv, "--work", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
