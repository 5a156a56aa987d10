"""``python -m llava_stf.train.run`` on ordinary bad input: one ``error: ...`` line, exit status 1, no model loaded.

The data is read and checked before the towers load, so every data mistake here fails without building a model;
``LLAVA_STF_DEBUG=1`` shows the traceback instead (``--debug`` belongs to ``TrainingArguments``).
"""

from __future__ import annotations

import json
import re

import pytest

from llava_stf.train import run as run_module
from llava_stf.train.fixtures import tiny_run_args


def records(world) -> list[dict]:
    return json.loads(world.instruct.read_text())


def write(world, name: str, text: str):
    path = world.instruct.parent / name
    path.write_text(text)
    return path


CASES = {
    "malformed JSON": (lambda w: write(w, "syntax.json", json.dumps(records(w))[:-40]), {}, "is not valid JSON"),
    "missing data file": (lambda w: w.instruct.parent / "nowhere.json", {}, "does not exist"),
    "empty data set": (lambda w: write(w, "empty.json", "[]"), {}, "holds no records"),
    "empty JSON lines": (lambda w: write(w, "empty.jsonl", "\n"), {}, "holds no records"),
    "missing image folder": (lambda w: w.instruct, {"image_folder": "/nowhere/images"}, "is not a folder"),
    "wrong image folder": (lambda w: w.instruct, {"image_folder": "{tmp}"}, "none of 40 probed images"),
    "half malformed": (
        lambda w: write(w, "half.jsonl", "\n".join(json.dumps(r) if i % 2 else "{" for i, r in enumerate(records(w)))),
        {},
        r"24 of 48 records .* unusable \({'malformed_record': 24}; e.g. malformed_record: line 1 is not a JSON",
    ),
    "bad setting": (lambda w: w.instruct, {"on_bad_sample": "ignore"}, "on_bad_sample must be one of"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line_before_any_model_loads(world, tmp_path, capsys, monkeypatch, case):
    make_data, flags, message = CASES[case]
    flags = {k: v.format(tmp=tmp_path) for k, v in flags.items()}
    argv = tiny_run_args(world.towers, make_data(world), tmp_path / "out", "finetune", max_steps=2, **flags)
    monkeypatch.setattr(run_module, "build", lambda *a, **k: pytest.fail("the towers were loaded before the data"))
    monkeypatch.delenv("LLAVA_STF_DEBUG", raising=False)
    assert run_module.main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and re.search(message, lines[0]) and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_bad_samples_met_in_training_are_one_error_line(world, tmp_path, capsys, monkeypatch):
    data = records(world)
    data[0]["image"] = "missing/0.png"
    argv = tiny_run_args(world.towers, write(world, "one_missing.json", json.dumps(data)), tmp_path / "out",
                         "finetune", max_steps=6, on_bad_sample="error")  # fmt: skip
    monkeypatch.delenv("LLAVA_STF_DEBUG", raising=False)
    assert run_module.main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "missing_image" in lines[0] and "on_bad_sample=error" in lines[0], err


def test_the_environment_variable_shows_the_traceback(world, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_STF_DEBUG", "1")
    argv = tiny_run_args(world.towers, write(world, "empty.json", "[]"), tmp_path / "out", "finetune")
    with pytest.raises(Exception, match="holds no records"):
        run_module.main(argv)
