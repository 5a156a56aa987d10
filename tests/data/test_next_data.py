"""AnyRes (LLaVA-NeXT) training data: each image gives its own crops, image size and placeholder count; the collator
pads crops (never image tokens), and the dummy image of a text-only batch runs the tower, projector and newline."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from llava_stf.data.collator import DataCollator
from llava_stf.data.conversation import get_template
from llava_stf.data.dataset import LazySupervisedDataset
from llava_stf.data.tokenization import IGNORE_INDEX, SkippedSample
from llava_stf.data.validate import main as validate_main
from llava_stf.data.validate import validate_dataset
from llava_stf.testing import (
    TINY_NEXT_CROP,
    make_image,
    tiny_next_config,
    tiny_next_model,
    tiny_next_processor,
    tiny_tokenizer,
)

# (width, height) -> crops: 56x56 and 112x56 give 2 tiles + base, 112x112 gives 4 tiles + base
SIZES = [(112, 112), (56, 56), (112, 56), (40, 90)]


@pytest.fixture(scope="module")
def kit():
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = tiny_next_config(tokenizer)
    return config, tiny_next_processor(config, tokenizer), tiny_next_model(config)


def _dataset(tmp_path, processor, with_text_only: bool = True) -> LazySupervisedDataset:
    records = []
    for i, size in enumerate(SIZES):
        make_image(i, size).save(tmp_path / f"{i}.png")
        conv = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": f"Colour {i}."}]
        records.append({"id": str(i), "image": f"{i}.png", "conversations": conv})
    if with_text_only:
        conv = [{"from": "human", "value": "Say two."}, {"from": "gpt", "value": "two"}]
        records.append({"id": "t", "conversations": conv})
    (tmp_path / "data.json").write_text(json.dumps(records))
    return LazySupervisedDataset(records, processor, get_template("vicuna_v1"), image_folder=tmp_path)


def test_each_item_holds_its_images_crops_size_and_own_placeholder_count(kit, tmp_path):
    config, processor, _ = kit
    dataset = _dataset(tmp_path, processor)
    for i, (width, height) in enumerate(SIZES):
        item = dataset[i]
        crops = config.num_crops(height, width)
        assert item["pixel_values"].shape == (crops, 3, TINY_NEXT_CROP, TINY_NEXT_CROP)
        assert item["image_sizes"].tolist() == [height, width]
        placeholders = int((item["input_ids"] == processor.image_token_id).sum())
        assert (
            placeholders
            == config.image_token_count(height, width)
            == processor.image_token_counts([make_image(i, (width, height))])[0]
        )
        assert (item["labels"][item["input_ids"] == processor.image_token_id] == IGNORE_INDEX).all()
    assert len({config.num_crops(h, w) for w, h in SIZES}) > 1  # the test mixes tile counts
    text_only = dataset[len(SIZES)]
    assert text_only["pixel_values"] is None and "image_sizes" not in text_only


def test_collator_pads_crops_not_image_tokens_and_the_model_takes_the_batch(kit, tmp_path):
    config, processor, model = kit
    dataset = _dataset(tmp_path, processor)
    items = [dataset[i] for i in range(len(dataset))]
    batch = DataCollator.from_processor(processor)(items)
    crops = [config.num_crops(h, w) for w, h in SIZES]
    assert batch["pixel_values"].shape == (len(SIZES), max(crops), 3, TINY_NEXT_CROP, TINY_NEXT_CROP)
    assert batch["image_sizes"].tolist() == [[h, w] for w, h in SIZES]
    for row, n in enumerate(crops):  # the padding crops are zeros, the real ones are each item's own
        torch.testing.assert_close(batch["pixel_values"][row, :n], items[row]["pixel_values"], rtol=0, atol=0)
        assert not batch["pixel_values"][row, n:].any()
    per_row = (batch["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert per_row == [config.image_token_count(h, w) for w, h in SIZES] + [0]
    assert batch["attention_mask"].sum(1).tolist() == [len(item["input_ids"]) for item in items]
    batch.pop("data_events")
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_text_only_batch_runs_the_tower_on_a_dummy_with_crops_and_size_and_changes_no_loss(kit, tmp_path):
    config, processor, model = kit
    dataset = _dataset(tmp_path, processor)
    items = [dataset[len(SIZES)]] * 2
    collator = DataCollator.from_processor(processor)
    batch = collator(items)
    dummy_count = processor.image_token_counts([make_image(0, (TINY_NEXT_CROP, TINY_NEXT_CROP))])[0]
    assert batch["pixel_values"].shape == (1, config.num_crops(TINY_NEXT_CROP, TINY_NEXT_CROP), 3, 56, 56)
    assert batch["image_sizes"].tolist() == [[TINY_NEXT_CROP, TINY_NEXT_CROP]]
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == dummy_count
    batch.pop("data_events")
    plain = DataCollator.from_processor(processor, always_run_vision=False)(items)
    plain.pop("data_events")
    assert "pixel_values" not in plain and "image_sizes" not in plain
    model.zero_grad()
    model.model.image_newline.requires_grad_(True)
    loss = model(**batch).loss
    loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(loss, model(**plain).loss)
    assert model.model.image_newline.grad is not None  # the newline is in the step's graph (ZeRO-3 / DDP)
    model.zero_grad()


def test_validate_counts_each_images_own_tokens_as_training_does(kit, tmp_path, capsys):
    config, processor, _ = kit
    dataset = _dataset(tmp_path, processor, with_text_only=False)
    lengths = sorted(len(dataset[i]["input_ids"]) for i in range(len(SIZES)))
    limit = lengths[1]  # between the shortest and the longest sample: some fit, some are cut
    report = validate_dataset(tmp_path / "data.json", tmp_path, "vicuna_v1", processor, max_length=limit)
    trained = LazySupervisedDataset(
        json.loads((tmp_path / "data.json").read_text()), processor, get_template("vicuna_v1"), tmp_path, limit
    )
    truncated, skipped = 0, Counter()
    for sample in trained.samples:
        try:
            truncated += int(trained.build(sample)["data_events"]["truncated"])
        except SkippedSample as err:
            skipped[err.reason] += 1
    assert (report.truncated, dict(report.problems)) == (truncated, dict(skipped))
    assert 0 < truncated + sum(skipped.values()) < len(SIZES)  # with one crop's 16 tokens each, all would fit
    folder = tmp_path / "processor"
    processor.save_pretrained(folder)
    argv = ["--data_path", str(tmp_path / "data.json"), "--image_folder", str(tmp_path), "--processor", str(folder)]
    assert validate_main([*argv, "--template", "vicuna_v1"]) == 0
    assert f"{len(SIZES)} records: {len(SIZES)} usable" in capsys.readouterr().out
