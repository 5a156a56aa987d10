"""The chat CLI in-process: scripted questions, answers on stdout, one ``error:`` line for every expected failure."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shutil

import pytest
import torch
from serve_helpers import BIG_PNG, SMALL_LIMIT

from llava_stf.generation import GenerationSettings, Generator
from llava_stf.serve.chat import ChatSession
from llava_stf.serve.cli import main
from llava_stf.serve.images import open_image_source

QUESTIONS = ["What is shown?", "What color is it?", "Is there a circle?"]


def _expected(checkpoint, image_source, questions, max_new_tokens=8) -> list[str]:
    session = ChatSession(
        Generator.from_pretrained(checkpoint, device="cpu"),
        open_image_source(str(image_source)),
        GenerationSettings(max_new_tokens),
    )
    return [session.ask(q) for q in questions]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_stdin_questions_until_eof_get_the_sessions_answers(serve_checkpoint, image_file, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(q + "\n" for q in QUESTIONS)))  # no empty line: EOF ends
    code, out, err = _run(capsys, "--model-path", serve_checkpoint, "--image-file", image_file, "--max-new-tokens", 8)
    assert code == 0 and "template vicuna_v1, image mode pad" in err
    assert out == "".join(a + "\n" for a in _expected(serve_checkpoint, image_file, QUESTIONS))


def test_queries_and_debug_records(serve_checkpoint, image_file, capsys):
    argv = ["--model-path", serve_checkpoint, "--image-file", image_file, "--max-new-tokens", 8, "--debug"]
    code, out, err = _run(capsys, *argv, "--query", QUESTIONS[0], "--query", QUESTIONS[1] + " <image>")
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    answers = _expected(serve_checkpoint, image_file, QUESTIONS[:2])
    assert code == 0 and out == "".join(a + "\n" for a in answers)
    assert [r["answer"] for r in records] == answers and [r["turn"] for r in records] == [0, 1]
    assert records[1]["prompt"].endswith(f"ASSISTANT: {answers[0]}</s>USER: {QUESTIONS[1]} ASSISTANT:")
    assert "note: removed <image> from the question" in err


def test_an_image_url_is_downloaded(serve_checkpoint, image_file, image_server, capsys):
    url = f"{image_server}/ok.png"
    argv = ["--model-path", serve_checkpoint, "--image-file", url, "--max-new-tokens", 8, "--query", QUESTIONS[0]]
    code, out, _ = _run(capsys, *argv, "--max-image-bytes", SMALL_LIMIT)
    assert code == 0 and out == _expected(serve_checkpoint, image_file, QUESTIONS[:1])[0] + "\n"


def _not_a_checkpoint(tmp_path, checkpoint):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    shutil.copy(checkpoint / "model.safetensors", folder)
    return folder


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing image", r"error: image file not found: .*missing\.png"),
        ("corrupt image", r"error: image file '.*corrupt\.png' is not a readable image"),
        ("not a checkpoint", r"error: .*weights-only is not a llava_stf checkpoint: no config\.json"),
        ("no checkpoint", r"error: checkpoint folder not found: .*nowhere"),
        ("url timeout", r"error: timed out after 0\.3 s downloading http://127\.0\.0\.1:\d+/slow\.png"),
        ("url too large", rf"error: http://127\.0\.0\.1:\d+/big\.png is \d+ bytes, over the limit of {SMALL_LIMIT}"),
        ("bad temperature", r"error: temperature must be >= 0"),
        # Added for issue 12 (each fails before it: no byte limit on files, no pixel / ratio flags).
        (
            "file too large",
            rf"error: image file '.*big\.png' is {len(BIG_PNG)} bytes > {SMALL_LIMIT} bytes \(the limits",
        ),
        ("too many pixels", r"error: image file '.*photo\.png' is 20x16 = 320 pixels > 100 \(the limits: --max"),
        ("bad ratio flag", r"error: --max-aspect-ratio is long side / short side, at least 1; got 0\.5$"),
        ("bad bytes flag", r"error: --max-image-bytes must be positive, got 0$"),
    ],
)
def test_expected_failures_print_one_error_line(
    case, message, serve_checkpoint, image_file, image_server, silent_server, tmp_path, capsys
):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    model, image, extra = serve_checkpoint, image_file, []
    if case == "missing image":
        image = tmp_path / "missing.png"
    elif case == "corrupt image":
        image = corrupt
    elif case == "not a checkpoint":
        model = _not_a_checkpoint(tmp_path, serve_checkpoint)
    elif case == "no checkpoint":
        model = tmp_path / "nowhere"
    elif case == "url timeout":
        image, extra = silent_server, ["--timeout", 0.3]
    elif case == "url too large":
        image, extra = f"{image_server}/big.png", ["--max-image-bytes", SMALL_LIMIT]
    elif case == "bad temperature":
        extra = ["--temperature", -1]
    elif case == "file too large":
        image, extra = tmp_path / "big.png", ["--max-image-bytes", SMALL_LIMIT]
        image.write_bytes(BIG_PNG)
    elif case == "too many pixels":
        extra = ["--max-image-pixels", 100]
    elif case == "bad ratio flag":
        extra = ["--max-aspect-ratio", 0.5]
    elif case == "bad bytes flag":
        extra = ["--max-image-bytes", 0]
    code, out, err = _run(capsys, "--model-path", model, "--image-file", image, "--query", "Hi?", *extra)
    assert (code, out) == (1, "")
    assert len(err.strip().splitlines()) == 1, err
    assert re.match(message, err), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when there is no CUDA")
def test_cuda_and_quantization_without_them_are_explained(serve_checkpoint, capsys):
    code, _, err = _run(capsys, "--model-path", serve_checkpoint, "--device", "cuda", "--query", "Hi?")
    assert code == 1 and err.strip() == (
        f"error: --device cuda: no CUDA device is available (torch {torch.__version__}); use --device cpu"
    )
    code, _, err = _run(capsys, "--model-path", serve_checkpoint, "--load-4bit", "--query", "Hi?")
    missing = "a CUDA device (the device is cpu)"
    if importlib.util.find_spec("bitsandbytes") is None:
        missing = "the bitsandbytes package (pip install it), " + missing
    assert code == 1 and err.strip() == f"error: --load-4bit needs bitsandbytes and CUDA; missing: {missing}"
    with pytest.raises(SystemExit):  # argparse: the two are exclusive
        main(["--model-path", str(serve_checkpoint), "--load-4bit", "--load-8bit"])


def test_an_over_long_question_stops_a_script_with_an_error(serve_checkpoint, image_file, capsys, monkeypatch):
    monkeypatch.setattr(ChatSession, "__init__", _with_context(ChatSession.__init__, 60))
    argv = ["--model-path", serve_checkpoint, "--image-file", image_file, "--max-new-tokens", 8]
    code, out, err = _run(capsys, *argv, "--query", "Hi?", "--query", "never asked")
    assert (code, out) == (1, "") and "over the model's context of 60" in err


def _with_context(init, length):
    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.context_length = length

    return patched


def test_non_utf8_stdin_stops_at_the_bad_line_keeping_the_answers_before_it(
    serve_checkpoint, image_file, capsys, monkeypatch
):
    """Fails before issue 12: a UnicodeDecodeError traceback (and no answer for the good line was printed)."""
    script = QUESTIONS[0].encode() + b"\n" + "caf\u00e9?".encode("latin-1") + b"\n" + QUESTIONS[1].encode() + b"\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(script), encoding="utf-8"))
    code, out, err = _run(capsys, "--model-path", serve_checkpoint, "--image-file", image_file, "--max-new-tokens", 8)
    assert code == 1 and out == _expected(serve_checkpoint, image_file, QUESTIONS[:1])[0] + "\n"
    assert err.strip().splitlines()[-1] == (
        "error: stdin line 2 is not utf-8 text (byte 0xe9 at position 4): convert the input (e.g. iconv -f latin1 "
        "-t utf-8) or set PYTHONIOENCODING to its encoding"
    )
    assert "Traceback" not in err


def test_an_undecodable_line_at_the_terminal_prompt_is_refused_and_the_chat_goes_on(capsys, monkeypatch):
    """Fails before issue 12: the UnicodeDecodeError from input() ended the chat with a traceback."""
    from llava_stf.serve.cli import _prompts

    typed = iter([UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "Hi?", "\udcff?", EOFError()])

    def fake_input(prompt):
        item = next(typed)
        if isinstance(item, BaseException):
            raise item
        return item

    monkeypatch.setattr("builtins.input", fake_input)
    assert list(_prompts()) == ["Hi?"]
    err = capsys.readouterr().err
    assert err.count("error: that line is not valid") == 2 and "Traceback" not in err


def test_debug_and_the_environment_show_the_traceback(serve_checkpoint, tmp_path, capsys, monkeypatch):
    """Fails before issue 12: --debug only added JSON records; a missing image was one line even with it."""
    from llava_stf.serve.images import ImageSourceError

    argv = ["--model-path", str(serve_checkpoint), "--image-file", str(tmp_path / "missing.png"), "--query", "Hi?"]
    with pytest.raises(ImageSourceError, match="image file not found"):
        main([*argv, "--debug"])
    monkeypatch.setenv("LLAVA_STF_DEBUG", "1")
    with pytest.raises(ImageSourceError):
        main(argv)
