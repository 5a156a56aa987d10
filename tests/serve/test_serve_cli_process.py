"""The chat CLI as a user runs it, in its own process: a scripted conversation on stdin, an interactive session in
a pseudo-terminal, and a bad image path (one error line, no traceback). Each run pays ~4 s of imports: kept to three."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from llava_stf.data.conversation import GPT, HUMAN, Turn, get_template
from llava_stf.generation import GenerationSettings, Generator
from llava_stf.serve.chat import ChatSession
from llava_stf.serve.images import open_image_source

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "llava_stf.serve.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "TERM": "dumb"}


def _answers(checkpoint, image_file, questions: list[str]) -> list[str]:
    generator = Generator.from_pretrained(checkpoint, device="cpu")
    session = ChatSession(generator, open_image_source(str(image_file)), GenerationSettings(8))
    return [session.ask(q) for q in questions]


def test_a_scripted_conversation_on_stdin(serve_checkpoint, image_file) -> None:
    script = "What is shown?\nWhat color is it</s>?\n\nNever asked: the empty line ended the chat.\n"
    argv = ["--model-path", serve_checkpoint, "--image-file", image_file, "--max-new-tokens", "8", "--debug"]
    done = subprocess.run([*CLI, *map(str, argv)], input=script, capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    first, second = _answers(serve_checkpoint, image_file, ["What is shown?", "What color is it?"])
    assert done.stdout == f"{first}\n{second}\n"  # only the answers, streamed, each ending with a newline
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert [r["answer"] for r in records] == [first, second]
    template = get_template("vicuna_v1")  # what the checkpoint's processor saved
    asked = [Turn(HUMAN, "<image>\nWhat is shown?"), Turn(GPT, first), Turn(HUMAN, "What color is it?")]
    assert [r["prompt"] for r in records] == [template.prompt(asked[:1]), template.prompt(asked)]
    assert records[1]["prompt"].count("</s>") == 1  # the template's one end-of-turn, no leaked special token
    assert "note: removed </s> from the question" in done.stderr and "Traceback" not in done.stderr


def _read_until(fd: int, marker: bytes, seen: bytearray, timeout: float = 60.0) -> None:
    """Read the terminal into ``seen`` until ``marker`` appears after what was already there."""
    start, deadline = len(seen), time.monotonic() + timeout
    while marker not in seen[start:]:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} within {timeout} s; terminal so far: {bytes(seen)!r}")
        try:
            data = os.read(fd, 4096)
        except OSError:  # EIO: the program closed the terminal
            data = b""
        if not data:
            raise AssertionError(f"terminal closed before {marker!r}; terminal so far: {bytes(seen)!r}")
        seen += data


def test_an_interactive_session_in_a_pseudo_terminal(serve_checkpoint, image_file) -> None:
    argv = ["--model-path", serve_checkpoint, "--image-file", image_file, "--max-new-tokens", "8"]
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [*CLI, *map(str, argv)], stdin=terminal, stdout=terminal, stderr=subprocess.PIPE, env=ENV
    )
    os.close(terminal)
    seen = bytearray()
    try:
        _read_until(controller, b"USER: ", seen)
        os.write(controller, b"What is shown?\n")
        _read_until(controller, b"USER: ", seen)
        os.write(controller, b"What color is it?\n")
        _read_until(controller, b"USER: ", seen)
        os.write(controller, b"\x04")  # Ctrl-D: end of input
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
    stderr = process.stderr.read().decode()
    first, second = _answers(serve_checkpoint, image_file, ["What is shown?", "What color is it?"])
    transcript = bytes(seen).decode().replace("\r\n", "\n")
    assert code == 0, stderr
    assert (
        f"USER: What is shown?\nASSISTANT: {first}\nUSER: What color is it?\nASSISTANT: {second}\nUSER: " in transcript
    )
    assert "an empty line or Ctrl-D quits" in stderr and "Traceback" not in stderr


def test_a_bad_image_path_is_one_line_and_no_traceback(serve_checkpoint, tmp_path) -> None:
    missing = tmp_path / "no-such-photo.jpg"
    argv = ["--model-path", serve_checkpoint, "--image-file", missing, "--query", "What is it?"]
    done = subprocess.run([*CLI, *map(str, argv)], capture_output=True, text=True, env=ENV, timeout=120)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.strip().splitlines()[-1] == f"error: image file not found: {missing}"
    assert "Traceback" not in done.stderr
