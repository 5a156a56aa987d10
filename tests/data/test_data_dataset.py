"""The LLaVA JSON dataset and the collator: record checks, lazy loading, bad-sample handling, truncation, batching."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from llava_stf.data.collator import DataCollator
from llava_stf.data.conversation import get_template
from llava_stf.data.dataset import (
    IMAGE_TAG_MISMATCH,
    MALFORMED_RECORD,
    TEMPLATE_MISMATCH,
    BadSampleError,
    LazySupervisedDataset,
    check_records,
    load_records,
    too_many_bad,
)
from llava_stf.data.images import MISSING_IMAGE, UNREADABLE_IMAGE
from llava_stf.data.tokenization import IGNORE_INDEX, NO_SUPERVISION, tokenize_conversation
from llava_stf.errors import UserError
from llava_stf.testing import make_image, tiny_config, tiny_model, tiny_processor

VICUNA = get_template("vicuna_v1")


def conv(*texts):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


GOOD = [
    {"id": "img", "image": "a.png", "conversations": conv("What color?\n<image>", "Red.")},
    {"id": "text", "conversations": conv("Hi", "Hello there.")},
    {"id": "multi", "image": "b.png", "conversations": conv("<image>\nWhat?", "A square.", "Why?", "It is red.")},
    {"id": "missing", "image": "nope.png", "conversations": conv("<image>\nWhat?", "Blue.")},
    {"id": "corrupt", "image": "bad.png", "conversations": conv("<image>\nWhat?", "Green.")},
    {"id": "after", "image": "a.png", "conversations": conv("<image>\nAnd now?", "Still red.")},
]
BAD_RECORDS = [
    {"id": "noconv", "image": "a.png"},
    {"id": "role", "conversations": [{"from": "system", "value": "x"}, {"from": "gpt", "value": "y"}]},
    {"id": "value", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}]},
    {"id": "notag", "image": "a.png", "conversations": conv("What is it?", "Red.")},
    {"id": "tag", "conversations": conv("<image>\nWhat is it?", "Red.")},
    {"id": "late", "image": "a.png", "conversations": conv("What?", "Red.", "<image> and?", "Red.")},
    "not a record",
]


@pytest.fixture(scope="module")
def processor(session_tokenizer):
    return tiny_processor(tiny_config(session_tokenizer), session_tokenizer)


@pytest.fixture
def folder(tmp_path):
    make_image(0, (40, 32)).save(tmp_path / "a.png")
    make_image(1, (24, 40)).save(tmp_path / "b.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    return tmp_path


def dataset(processor, folder, records=GOOD + BAD_RECORDS, **kwargs):
    return LazySupervisedDataset(records, processor, kwargs.pop("template", VICUNA), image_folder=folder, **kwargs)


def test_bad_records_are_dropped_and_counted_by_reason(processor, folder):
    ds = dataset(processor, folder)
    assert [s.id for s in ds.samples] == [r["id"] for r in GOOD]
    assert ds.dropped_records == {MALFORMED_RECORD: 4, IMAGE_TAG_MISMATCH: 3}


def test_error_mode_refuses_bad_records_up_front(processor, folder):
    with pytest.raises(BadSampleError, match="image_tag_mismatch"):
        dataset(processor, folder, on_bad_sample="error")
    with pytest.raises(ValueError, match="on_bad_sample"):
        dataset(processor, folder, on_bad_sample="ignore")


def test_plain_template_rejects_multi_turn_and_text_only_records(processor, folder):
    ds = dataset(processor, folder, GOOD, template=get_template("plain"))
    assert ds.dropped_records == {TEMPLATE_MISMATCH: 2}
    assert "multi" not in [s.id for s in ds.samples] and "text" not in [s.id for s in ds.samples]


def test_items_are_the_tokenization_and_the_processed_image(processor, folder):
    ds = dataset(processor, folder, GOOD)
    item = ds[0]
    expected = tokenize_conversation(ds.samples[0].turns, VICUNA, processor.tokenizer, processor)
    assert item["input_ids"].tolist() == expected.input_ids and item["labels"].tolist() == expected.labels
    assert (item["input_ids"] == processor.image_token_id).sum() == processor.num_image_tokens
    torch.testing.assert_close(item["pixel_values"], processor.preprocess_images([Image.open(folder / "a.png")])[0])
    assert item["data_events"] == {"skipped": [], "truncated": 0}
    text = ds[1]
    assert text["pixel_values"] is None and processor.image_token_id not in text["input_ids"].tolist()


def test_bad_image_is_replaced_by_the_next_sample_and_reported(processor, folder):
    ds = dataset(processor, folder, GOOD)
    item = ds[3]  # "missing", then "corrupt", then "after"
    assert item["data_events"]["skipped"] == [MISSING_IMAGE, UNREADABLE_IMAGE]
    assert torch.equal(item["input_ids"], ds.build(ds.samples[5])["input_ids"])
    assert ds[3]["data_events"]["skipped"] == [MISSING_IMAGE, UNREADABLE_IMAGE]  # deterministic on every visit


def test_error_mode_raises_on_first_use_of_a_bad_image(processor, folder):
    ds = dataset(processor, folder, GOOD, on_bad_sample="error")
    ds[0]
    with pytest.raises(BadSampleError, match="missing"):
        ds[3]


def test_many_bad_samples_in_a_row_stop_the_run(processor, folder):
    records = [GOOD[0]] + [dict(GOOD[3], id=f"m{i}") for i in range(5)]
    ds = dataset(processor, folder, records, max_consecutive_bad=3)
    with pytest.raises(BadSampleError, match="in a row"):
        ds[1]


def test_wrong_or_missing_image_folder_fails_at_construction(processor, folder, tmp_path_factory):
    with pytest.raises(FileNotFoundError, match="image_folder"):
        dataset(processor, tmp_path_factory.mktemp("empty"), GOOD)
    with pytest.raises(ValueError, match="no image_folder"):
        LazySupervisedDataset(GOOD, processor, VICUNA)


def test_truncation_counts_image_tokens_and_skips_samples_without_answers(processor, folder):
    full = dataset(processor, folder, GOOD)
    multi = full[2]
    ds = dataset(processor, folder, GOOD, max_length=len(multi["input_ids"]) - 1)
    cut = ds[2]
    assert cut["data_events"]["truncated"] == 1 and len(cut["input_ids"]) < len(multi["input_ids"])
    assert (cut["input_ids"] == processor.image_token_id).sum() == processor.num_image_tokens  # image span whole
    assert processor.tokenizer.decode(cut["labels"][cut["labels"] != IGNORE_INDEX]) == " A square.</s>"  # round 1
    first_answer = [i for i, t in enumerate(full[0]["labels"].tolist()) if t != IGNORE_INDEX][0]
    short = dataset(processor, folder, GOOD, max_length=first_answer)  # the text-only sample still fits
    assert len(full[1]["input_ids"]) <= first_answer
    item = short[0]
    assert item["data_events"]["skipped"] == [NO_SUPERVISION] and torch.equal(item["input_ids"], full[1]["input_ids"])


def test_length_proxies(processor, folder):
    ds = dataset(processor, folder, GOOD)
    words = [sum(len(t.text.split()) for t in s.turns) for s in ds.samples]
    assert ds.modality_lengths == [w if s.image else -w for w, s in zip(words, ds.samples)]
    assert ds.lengths[0] == words[0] + processor.num_image_tokens and ds.lengths[1] == words[1]


def test_load_records_json_and_jsonl(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(GOOD))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in GOOD) + "\n")
    assert load_records(tmp_path / "d.json") == load_records(tmp_path / "d.jsonl") == GOOD
    (tmp_path / "o.json").write_text("{}")
    with pytest.raises(UserError, match="JSON list"):
        load_records(tmp_path / "o.json")
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "none.json")


# ------------------------------------------------------------------------------------------------------ collator
def test_collator_pads_right_and_stacks_images_in_row_order(processor, folder):
    ds = dataset(processor, folder, GOOD)
    items = [ds[1], ds[0], ds[2]]
    batch = DataCollator.from_processor(processor)(items)
    width = max(len(i["input_ids"]) for i in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
    torch.testing.assert_close(batch["pixel_values"], torch.stack([items[1]["pixel_values"], items[2]["pixel_values"]]))
    assert batch["data_events"] == {"skipped": [], "truncated": 0}


def test_text_only_batch_runs_the_vision_tower_without_changing_the_loss(processor, folder, session_tokenizer):
    ds = dataset(processor, folder, GOOD)
    items = [ds[1], dict(ds[1], data_events={"skipped": ["missing_image"], "truncated": 1})]
    with_dummy = DataCollator.from_processor(processor)(items)
    without = DataCollator.from_processor(processor, always_run_vision=False)(items)
    assert "pixel_values" not in without and with_dummy["pixel_values"].shape[0] == 1
    n = len(items[0]["input_ids"])
    assert (with_dummy["input_ids"][0, n:] == processor.image_token_id).sum() == processor.num_image_tokens
    assert with_dummy["attention_mask"][0, n:].sum() == 0 and (with_dummy["labels"][0, n:] == IGNORE_INDEX).all()
    assert with_dummy["data_events"] == {"skipped": ["missing_image"], "truncated": 1}

    model = tiny_model(tiny_config(session_tokenizer)).train()
    losses, grads = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: a second thread only costs when other processes share the cores
    for batch in (with_dummy, without):
        model.zero_grad(set_to_none=True)
        batch = {k: v for k, v in batch.items() if k != "data_events"}
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in model.model.multi_modal_projector.parameters()])
    torch.set_num_threads(threads)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads[0])  # in the graph, zero gradient
    assert all(g is None for g in grads[1])


# ------------------------------------------------------------------------------------------ load-time accounting
def test_a_malformed_jsonl_line_is_a_counted_malformed_record(processor, folder):
    lines = [json.dumps(GOOD[0]), '{"id": "cut", "conversations": [', "", json.dumps(GOOD[1]), "\xff not utf-8"]
    (folder / "d.jsonl").write_bytes("\n".join(lines).encode("utf-8").replace(b"\xc3\xbf", b"\xff"))
    records = load_records(folder / "d.jsonl")
    assert len(records) == 4 and records[0] == GOOD[0] and records[2] == GOOD[1]
    ds = dataset(processor, folder, records)
    assert [s.id for s in ds.samples] == ["img", "text"] and (ds.num_records, ds.dropped_records) == (
        4,
        {MALFORMED_RECORD: 2},
    )
    checked = check_records(records, VICUNA, folder)
    assert any("line 2 is not a JSON record" in m for m in checked.examples[MALFORMED_RECORD])
    assert any("line 5" in m and "UTF-8" in m for m in checked.examples[MALFORMED_RECORD])


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("empty.json", "", "holds no records"),
        ("empty_list.json", "[]", "holds no records"),
        ("blank.jsonl", "\n  \n", "holds no records"),
        ("syntax.json", '[{"id": 1},\n {"id": 2,}]', r"not valid JSON: .* \(line 2, column 11\)"),
        ("lines.json", '{"id": 1}\n{"id": 2}\n', "name the file .jsonl"),
        ("latin1.json", '[{"id": "caf\xe9"}]'.encode("latin-1"), "not UTF-8 text"),
    ],
)
def test_empty_or_unparsable_files_are_errors(tmp_path, name, text, message):
    (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    with pytest.raises(UserError, match=message):
        load_records(tmp_path / name)


def test_no_usable_record_and_a_wrong_image_folder_are_errors(processor, folder, tmp_path_factory):
    with pytest.raises(UserError, match="no usable record among 7"):
        check_records(BAD_RECORDS, VICUNA, folder)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        check_records(GOOD, VICUNA, folder / "nowhere")


@pytest.mark.parametrize(
    ("records", "dropped", "drawn", "skipped", "stops"),
    [
        (10, 1, 0, 0, False),  # a tiny data set survives one bad record ...
        (10, 1, 10, 1, False),  # ... and one bad image besides
        (10, 5, 0, 0, True),  # a half-malformed file stops before the first draw
        (48, 24, 0, 0, True),
        (665_000, 0, 8, 1, False),  # one bad sample in the first batch is chance
        (665_000, 0, 16, 8, True),  # half the images missing: the first batch stops the run
        (665_000, 0, 10_000, 450, False),  # 4.5 %: within the limit
        (665_000, 0, 10_000, 700, True),  # 7 %
        (665_000, 26_600, 10_000, 300, True),  # 4 % dropped + 3 % of the rest skipped: 6.9 % in all
        (665_000, 26_600, 10_000, 50, False),  # 4 % + 0.5 %
    ],
)
def test_the_bad_sample_rule(records, dropped, drawn, skipped, stops):
    assert too_many_bad(0.05, records, dropped, drawn, skipped) is stops
    assert not too_many_bad(1.0, records, dropped, drawn, skipped)
