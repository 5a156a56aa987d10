"""Bad samples during a run: counted by reason in the trainer's logs, fatal with on_bad_sample=error or past a limit."""

from __future__ import annotations

import json

import pytest
from transformers import TrainingArguments

from llava_stf.data.dataset import BadSampleError
from llava_stf.testing import tiny_config, tiny_model
from llava_stf.train.arguments import parse_config
from llava_stf.train.fixtures import tiny_run_args
from llava_stf.train.run import run
from llava_stf.train.trainer import LlavaStfTrainer


@pytest.fixture
def broken_data(world, tmp_path):
    """The instruction set with every 4th image missing and one truncated file (written next to the good images)."""
    records = json.loads(world.instruct.read_text())
    for i, record in enumerate(records):
        if "image" in record and i % 4 == 0:
            record["image"] = f"missing/{i}.png"
    records[1]["image"] = "../broken.png"
    (world.instruct.parent.parent / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    path = world.instruct.parent / "broken.json"
    path.write_text(json.dumps(records))
    return path


def test_bad_samples_are_replaced_counted_and_logged(world, broken_data, tmp_path):
    trainer = run(parse_config(tiny_run_args(world.towers, broken_data, tmp_path / "out", "finetune", max_steps=6)))
    counts = trainer.data_counts
    assert counts["skipped/missing_image"] >= 6 and counts["skipped/unreadable_image"] >= 1  # also met as a stand-in
    assert counts["skipped"] == counts["skipped/missing_image"] + counts["skipped/unreadable_image"]
    assert counts["samples"] == 6 * 8 + counts["skipped"]
    assert trainer.state.log_history[-1]["data/skipped"] == counts["skipped"]


def test_error_mode_stops_the_run(world, broken_data, tmp_path):
    argv = tiny_run_args(world.towers, broken_data, tmp_path / "out", "finetune", max_steps=6, on_bad_sample="error")
    with pytest.raises(BadSampleError, match="missing"):
        run(parse_config(argv))


def test_too_many_bad_samples_stop_the_run(session_tokenizer, tmp_path):
    args = TrainingArguments(tmp_path, use_cpu=True, report_to="none")
    trainer = LlavaStfTrainer(model=tiny_model(tiny_config(session_tokenizer)), args=args, max_bad_sample_fraction=0.1)
    trainer.count_data_events({"skipped": ["missing_image"] * 10, "truncated": 2}, batch_size=100)  # 10 / 110
    assert trainer.data_counts["truncated"] == 2
    trainer.count_data_events({"skipped": [], "truncated": 0}, batch_size=100)  # 10 / 210: still fine
    with pytest.raises(BadSampleError, match="max_bad_sample_fraction"):
        trainer.count_data_events({"skipped": ["unreadable_image"] * 20, "truncated": 0}, batch_size=10)
