"""The ``llava-stf`` console script: command list, errors, dispatch to the entry points, exit status."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest

from llava_stf import cli


def test_help_lists_each_command_on_one_line(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llava-stf <command>")
    for name, command in cli.COMMANDS.items():
        (line,) = [line for line in out.splitlines() if line.split()[:1] == [name]]
        assert command.summary in line and f"python -m {command.python_m}" in line


@pytest.mark.parametrize("argv", [[], ["trian"], ["--train"]])
def test_no_or_unknown_command_is_one_error_line_and_the_list(argv, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    first, *rest = captured.err.splitlines()
    assert first.startswith("llava-stf: error: ") and rest[0].startswith("usage: llava-stf")
    assert all(any(line.split()[:1] == [name] for line in rest) for name in cli.COMMANDS)
    if argv == ["trian"]:
        assert "unknown command 'trian'; did you mean 'train'?" in first


def test_every_command_names_a_module_with_main():
    for name, command in cli.COMMANDS.items():
        spec = importlib.util.find_spec(command.module)
        assert spec is not None and spec.origin, f"{name}: no module {command.module}"
        assert "\ndef main(argv" in Path(spec.origin).read_text(), f"{name}: {command.module} has no main(argv)"
        assert importlib.util.find_spec(command.python_m) is not None  # the documented python -m form


def test_presets_dispatch(capsys):
    assert cli.main(["presets", "llava-stf-7b"]) == 0  # presets' main returns None
    out = capsys.readouterr().out
    assert "llava-stf-7b" in out and "mbtf_stf" in out and "144" in out


def test_a_command_help_is_its_own(capsys):
    argv0 = sys.argv[0]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["presets", "--help"])
    assert exit_.value.code == 0 and sys.argv[0] == argv0
    assert capsys.readouterr().out.startswith("usage: llava-stf presets [-h] [names ...]")


def test_the_exit_status_is_the_command_return_value(monkeypatch):
    received = []
    fake = types.ModuleType("fake_command")
    fake.main = lambda argv: received.append(argv) or 3
    monkeypatch.setitem(sys.modules, "fake_command", fake)
    monkeypatch.setitem(cli.COMMANDS, "fake", cli.Command("fake_command", "a stand-in"))
    assert cli.main(["fake", "--x", "1"]) == 3 and received == [["--x", "1"]]


def test_help_imports_no_command():
    code = "import sys, llava_stf.cli as c; c.main(['--help']); print(*sys.modules, file=sys.stderr)"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr.split()
    loaded = [c.module for c in cli.COMMANDS.values() if c.module in imported]
    assert not loaded, f"llava-stf --help imported {loaded}"
