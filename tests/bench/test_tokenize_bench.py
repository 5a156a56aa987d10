"""``python -m llava_stf.bench.tokenize``: both settings timed on the same records, the memo restored after."""

from __future__ import annotations

import tempfile

import pytest

from llava_stf.bench.tokenize import main
from llava_stf.data import tokenization


def test_bench_times_memo_off_and_on_and_restores_the_setting(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the generated world is written
    assert main(["--records", "40", "--repeats", "2"]) == 0
    assert not any(tmp_path.iterdir())  # and removed after reading
    out = capsys.readouterr().out
    assert "40 records" in out and "memo off" in out and "memo on, later passes" in out
    assert tokenization.MEMO_ENTRIES > 0


def test_bench_wants_data_and_tokenizer_together(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--data", "x.json"])
    assert "--data and --tokenizer go together" in capsys.readouterr().err


def test_bench_bad_data_is_one_error_line(tmp_path, capsys) -> None:
    missing = tmp_path / "missing.json"
    assert main(["--data", str(missing), "--tokenizer", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "missing.json" in err[0]
    (tmp_path / "dict.json").write_text('{"id": 1}')
    assert main(["--data", str(tmp_path / "dict.json"), "--tokenizer", str(tmp_path)]) == 1
    assert "expected a JSON list" in capsys.readouterr().err
    assert main(["--template", "nope"]) == 1
    assert "unknown conversation template" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--repeats", "0"])
