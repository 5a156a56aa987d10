"""Bad data in a run: counted by reason in the trainer's logs, fatal with on_bad_sample=error or past the limit.

The limit counts the records dropped when the file is read as well as the draws skipped later, from the first draw
(``llava_stf.data.dataset.too_many_bad``), and a file with too many dropped records stops before any model is built.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from torch.utils.data import Dataset
from transformers import TrainingArguments

from llava_stf.data.dataset import BadSampleError
from llava_stf.testing import tiny_config, tiny_model
from llava_stf.train import run as run_module
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
    argv = tiny_run_args(
        world.towers, broken_data, tmp_path / "out", "finetune", max_steps=6, max_bad_sample_fraction=0.5
    )
    trainer = run(parse_config(argv))  # a quarter of the images are missing: within a limit of one half
    counts = trainer.data_counts
    assert counts["skipped/missing_image"] >= 6 and counts["skipped/unreadable_image"] >= 1  # also met as a stand-in
    assert counts["skipped"] == counts["skipped/missing_image"] + counts["skipped/unreadable_image"]
    assert counts["samples"] == 6 * 8 + counts["skipped"]
    assert trainer.state.log_history[-1]["data/skipped"] == counts["skipped"]


def test_error_mode_stops_the_run(world, broken_data, tmp_path):
    argv = tiny_run_args(world.towers, broken_data, tmp_path / "out", "finetune", max_steps=6, on_bad_sample="error")
    with pytest.raises(BadSampleError, match="missing"):
        run(parse_config(argv))


class Loaded(Dataset):
    """A stand-in for the dataset's load-time counts."""

    def __init__(self, num_records: int, dropped: dict[str, int]):
        self.num_records, self.dropped_records = num_records, Counter(dropped)

    def __len__(self) -> int:
        return self.num_records - sum(self.dropped_records.values())

    def __getitem__(self, i):
        raise NotImplementedError


def trainer_for(tokenizer, tmp_path, limit: float, dataset: Dataset | None = None) -> LlavaStfTrainer:
    args = TrainingArguments(tmp_path, use_cpu=True, report_to="none")
    model = tiny_model(tiny_config(tokenizer))
    return LlavaStfTrainer(model=model, args=args, train_dataset=dataset, max_bad_sample_fraction=limit)


def test_bad_samples_are_judged_from_the_first_draw(session_tokenizer, tmp_path):
    trainer = trainer_for(session_tokenizer, tmp_path, 0.05)
    trainer.count_data_events({"skipped": ["missing_image"], "truncated": 2}, batch_size=8)  # 1 of 9: chance
    assert trainer.data_counts["truncated"] == 2 and trainer.data_counts["samples"] == 9
    with pytest.raises(BadSampleError, match=r"8 of 17 samples drawn skipped .*max_bad_sample_fraction=0.05"):
        trainer.count_data_events({"skipped": ["missing_image"] * 7, "truncated": 0}, batch_size=1)


def test_records_dropped_at_load_count_against_the_limit(session_tokenizer, tmp_path):
    loaded = Loaded(1000, {"malformed_record": 40})  # 4 %: within 5 % alone
    trainer = trainer_for(session_tokenizer, tmp_path, 0.05, loaded)
    assert trainer.data_counts == {"records": 1000, "dropped": 40, "dropped/malformed_record": 40}
    trainer.count_data_events({"skipped": ["missing_image"] * 5, "truncated": 0}, batch_size=395)  # 1.25 % more
    with pytest.raises(BadSampleError, match=r"40 of 1000 records dropped .*'dropped/malformed_record': 40"):
        trainer.count_data_events({"skipped": ["missing_image"] * 25, "truncated": 0}, batch_size=375)  # +3.75 %


def test_a_half_malformed_file_stops_before_the_towers_load(world, tmp_path, monkeypatch):
    records = json.loads(world.instruct.read_text())
    for record in records[::2]:
        del record["conversations"]
    data = world.instruct.parent / "half_malformed.json"
    data.write_text(json.dumps(records))
    monkeypatch.setattr(run_module, "build", lambda *a, **k: pytest.fail("the towers were loaded before the data"))
    with pytest.raises(BadSampleError, match=r"24 of 48 records .* are unusable \({'malformed_record': 24}"):
        run(parse_config(tiny_run_args(world.towers, data, tmp_path / "out", "finetune", max_steps=2)))
    assert not (tmp_path / "out").exists()


def test_one_bad_record_in_a_small_file_trains(world, tmp_path):
    records = json.loads(world.instruct.read_text())[:10]
    records[3]["conversations"][0]["from"] = "robot"
    data = world.instruct.parent / "one_bad.json"
    data.write_text(json.dumps(records))
    trainer = run(parse_config(tiny_run_args(world.towers, data, tmp_path / "out", "finetune", max_steps=2)))
    assert trainer.state.global_step == 2
    assert trainer.data_counts["dropped/malformed_record"] == 1 and trainer.data_counts["records"] == 10
    assert trainer.state.log_history[0]["data/dropped"] == 1
