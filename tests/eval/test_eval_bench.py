"""``python -m llava_stf.bench.eval`` runs end to end and prints one row per batch size (no timing asserted)."""

from __future__ import annotations

from llava_stf.bench.eval import main


def test_bench_eval_prints_every_batch_size(capsys) -> None:
    main(["--questions", "4", "--batch-sizes", "1", "2", "--max-new-tokens", "2", "--repeats", "1", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("model tiny:") and "4 questions x 2 new tokens" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == ["1", "2"]
    assert lines[2].endswith("1.00x")
