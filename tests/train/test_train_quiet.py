"""``run(config, quiet=True)``: no log dicts on the terminal (bar or no bar), every log kept in the history."""

from __future__ import annotations

import pytest

from llava_stf.train.arguments import parse_config
from llava_stf.train.fixtures import tiny_run_args
from llava_stf.train.run import run


@pytest.mark.parametrize("bar", [False, True])
def test_quiet_run_prints_no_log_dicts_but_keeps_them(world, tmp_path, capsys, bar) -> None:
    def train(name: str, quiet: bool) -> tuple[str, list[dict]]:
        argv = tiny_run_args(world.towers, world.captions, tmp_path / name, "pretrain", disable_tqdm=not bar)
        trainer = run(parse_config(argv), quiet=quiet)
        captured = capsys.readouterr()
        return captured.out + captured.err, trainer.state.log_history

    loud, loud_history = train("loud", quiet=False)
    quiet, quiet_history = train("quiet", quiet=True)
    assert "'loss'" in loud and "'train_runtime'" in loud  # transformers prints every log (PrinterCallback / bar)
    assert "'loss'" not in quiet and "'train_runtime'" not in quiet
    assert [h.keys() for h in quiet_history] == [h.keys() for h in loud_history]
    assert any("train_loss" in h for h in quiet_history)
