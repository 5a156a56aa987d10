"""``python -m llava_stf.bench.tokenize``: both settings timed on the same records, the memo restored after."""

from __future__ import annotations

import pytest

from llava_stf.bench.tokenize import main
from llava_stf.data import tokenization


def test_bench_times_memo_off_and_on_and_restores_the_setting(capsys) -> None:
    assert main(["--records", "40", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "40 records" in out and "memo off" in out and "memo on, later passes" in out
    assert tokenization.MEMO_ENTRIES > 0


def test_bench_wants_data_and_tokenizer_together(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--data", "x.json"])
    assert "--data and --tokenizer go together" in capsys.readouterr().err
