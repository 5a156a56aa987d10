"""The convert command on ordinary bad input: one ``error:`` line, exit status 1, nothing overwritten or half-written.

Every test here was added for issue 12 and fails before it (an existing projector file was overwritten, a crash left a
half-written file, a corrupt file or a wrong folder gave a traceback, exit status 2 came from ``parser.exit``).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_convert_llava import make_source
from torch import nn

import llava_stf.convert as convert_module
from llava_stf.convert import convert_projector_file, main
from llava_stf.errors import UserError
from llava_stf.testing import save_tiny_checkpoint


@pytest.fixture
def projector_bin(tmp_path):
    projector = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64))
    path = tmp_path / "mm_projector.bin"
    torch.save({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}, path)
    return path


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert lines and "Traceback" not in err, err
    return lines[-1]


def test_projector_only_refuses_an_existing_file_unless_overwrite(projector_bin, tmp_path, capsys):
    dst = tmp_path / "projector.safetensors"
    dst.write_bytes(b"keep me")
    code, out, err = _run(capsys, "--projector-only", "--from", "llava", projector_bin, dst)
    assert (code, out) == (1, "") and dst.read_bytes() == b"keep me"
    assert _error_line(err) == f"error: {dst} already exists; pass --overwrite to replace it"
    code, out, _ = _run(capsys, "--projector-only", "--from", "llava", projector_bin, dst, "--overwrite")
    assert (code, out) == (0, f"wrote {dst}\n")
    assert set(load_file(dst)) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mm_projector.bin", "projector.safetensors"]  # no temp left


def test_a_crash_while_writing_leaves_the_old_file_and_no_temporary(projector_bin, tmp_path, monkeypatch):
    dst = tmp_path / "projector.safetensors"
    dst.write_bytes(b"keep me")

    def crash(tensors, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write

    monkeypatch.setattr(convert_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_projector_file("llava", projector_bin, dst, overwrite=True)
    assert dst.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mm_projector.bin", "projector.safetensors"]


def test_folder_outputs_are_replaced_only_with_overwrite_and_never_over_the_source(tmp_path, capsys):
    source = make_source(tmp_path, with_tower=True, shards=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("an earlier conversion")
    code, _, err = _run(capsys, "--from", "llava", source.src, out)
    assert code == 1 and _error_line(err) == f"error: {out} already exists; pass --overwrite to replace it"
    assert (out / "old.txt").is_file()
    code, _, err = _run(capsys, "--from", "llava", source.src, out, "--overwrite")
    assert code == 0, err
    assert not (out / "old.txt").exists() and json.loads((out / "config.json").read_text())["model_type"] == "llava_stf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip", "llava", "out"]  # no .out.partial-* / .out.old-*
    code, _, err = _run(capsys, "--to", "llava-hf", out, out, "--overwrite")
    assert (
        code == 1 and _error_line(err) == f"error: {out} holds the source {out}: replacing it would delete the source"
    )
    assert (out / "config.json").is_file()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing folder", "error: source folder not found: {tmp}/nowhere"),
        ("a file", "error: {tmp}/mm_projector.bin is a file, not a checkpoint folder (an mm_projector.bin converts "
         "with --projector-only)"),
        ("no config", "error: {tmp}/empty is not a checkpoint folder: no config.json"),
        ("broken config", "error: {tmp}/broken/config.json is not a readable JSON file: Expecting value: line 1 "
         "column 1 (char 0)"),
        ("ours", "error: {tmp}/ours is already a llava_stf checkpoint (model_type 'llava_stf'): nothing to convert "
         "(to export an mlp2x_gelu one to transformers' LLaVA: --to llava-hf)"),
        ("llava as llava-hf", "error: {tmp}/llava/config.json is not a llava-hf config (model_type 'llava_llama', "
         "no text_config); an original LLaVA config: use --from llava or --from llava-stf-official"),
        ("output in a file", "error: {tmp}/mm_projector.bin is not a folder, so {tmp}/mm_projector.bin/out cannot be "
         "written"),
    ],
)  # fmt: skip
def test_bad_sources_and_destinations_are_one_line(case, expected, tmp_path, projector_bin, capsys):
    src, dst, source = tmp_path / "nowhere", tmp_path / "out", "llava"
    if case == "a file":
        src = projector_bin
    elif case == "no config":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "broken config":
        src = tmp_path / "broken"
        src.mkdir()
        (src / "config.json").write_text("")
    elif case == "ours":
        src = save_tiny_checkpoint(tmp_path / "ours")
    elif case == "llava as llava-hf":
        src, source = make_source(tmp_path, shards=1).src, "llava-hf"
    elif case == "output in a file":
        src, dst = make_source(tmp_path, shards=1).src, projector_bin / "out"
    code, out, err = _run(capsys, "--from", source, src, dst)
    assert (code, out) == (1, "")
    assert _error_line(err) == expected.format(tmp=tmp_path)
    assert not (tmp_path / "out").exists()


def test_export_from_a_folder_that_is_not_ours_is_one_line(tmp_path, capsys):
    src = tmp_path / "llava"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llava_llama"}))
    code, _, err = _run(capsys, "--to", "llava-hf", src, tmp_path / "hf")
    assert code == 1 and _error_line(err).startswith(f"error: {src} holds a 'llava_llama' model, not a llava_stf")


@pytest.mark.parametrize("content", [b"not a pickle", b"\x80\x02K\x01."])  # garbage; a pickled int, not tensors
def test_an_unreadable_projector_file_is_one_line(content, tmp_path, capsys):
    bad = tmp_path / "mm_projector.bin"
    bad.write_bytes(content)
    code, _, err = _run(capsys, "--projector-only", "--from", "llava", bad, tmp_path / "p.safetensors")
    line = _error_line(err)
    assert code == 1 and (
        line.startswith(f"error: {bad} is not a readable weights file (")
        or line == f"error: {bad} does not hold a dict of tensors (a state dict), but a int"
    )
    code, _, err = _run(capsys, "--projector-only", "--from", "llava", tmp_path / "no.bin", tmp_path / "p.safetensors")
    assert code == 1 and _error_line(err) == f"error: projector file not found: {tmp_path / 'no.bin'}"
    assert not (tmp_path / "p.safetensors").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UserError, match="source folder not found"):
        main(["--from", "llava", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--debug"])
