"""The chat CLI runs a checkpoint under another token reducer (``--reducer NAME --tokens N``), loaded as evaluation
loads it; a reducer that cannot run is one ``error:`` line before the model loads."""

from __future__ import annotations

import pytest

from llava_stf.generation import GenerationSettings, Generator
from llava_stf.reducer_choice import ReducerChoice
from llava_stf.serve import cli
from llava_stf.serve.chat import ChatSession
from llava_stf.serve.images import open_image_source


def test_chat_with_a_budgeted_reducer_answers_as_the_reduced_model(serve_checkpoint, image_file, capsys):
    argv = ["--model-path", serve_checkpoint, "--image-file", image_file, "--max-new-tokens", 6, "--query", "Hi?"]
    assert cli.main([str(a) for a in [*argv, "--reducer", "fastv", "--tokens", 4]]) == 0
    out, err = capsys.readouterr()
    assert "fastv @ 4 tokens: k=2 r=0.75; 16 image tokens per image" in err and "reducer fastv, 16 image tokens" in err
    generator = Generator.from_pretrained(serve_checkpoint, "cpu", reducer=ReducerChoice("fastv", None, 4))
    session = ChatSession(generator, open_image_source(str(image_file)), GenerationSettings(6))
    assert out == session.ask("Hi?") + "\n"


def test_a_reducer_that_cannot_run_is_one_line(serve_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_checkpoint", lambda *a, **k: pytest.fail("no model may be loaded"))
    assert cli.main(["--model-path", str(serve_checkpoint), "--query", "Hi?", "--reducer", "prumerge_plus"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: reducer_type 'prumerge_plus' passes a reduced set") and err.count("\n") == 1
