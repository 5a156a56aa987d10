"""``python -m llava_stf.data.validate``: every kind of problem found, counted and named; a clean set passes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from llava_stf.data.conversation import get_template
from llava_stf.data.dataset import check_records, load_records
from llava_stf.data.validate import main, validate_dataset
from llava_stf.testing import make_image, tiny_config, tiny_processor


def conv(question: str, answer: str):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_broken_set(folder):
    make_image(0).save(folder / "ok.png")
    make_image(1).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(folder / "deep.png")
    (folder / "junk.jpg").write_bytes(b"not an image at all")
    make_image(2, (64, 64)).save(folder / "cut.jpg", format="JPEG")
    data = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (500, 5)).save(folder / "strip.png")
    records = [
        {"id": "ok", "image": "ok.png", "conversations": conv("<image>\nWhat?", "A thing.")},
        {"id": "rgba", "image": "rgba.png", "conversations": conv("<image>\nWhat?", "A thing.")},
        {"id": "deep", "image": "deep.png", "conversations": conv("<image>\nWhat?", "A thing.")},
        {"id": "text", "conversations": conv("Hello?", "Hi.")},
        {"id": "gone", "image": "gone.png", "conversations": conv("<image>\nWhat?", "A thing.")},
        {"id": "junk", "image": "junk.jpg", "conversations": conv("<image>\nWhat?", "A thing.")},
        {"id": "cut", "image": "cut.jpg", "conversations": conv("<image>\nWhat?", "A thing.")},
        {"id": "strip", "image": "strip.png", "conversations": conv("<image>\nWhat?", "A thing.")},
        {"id": "notag", "image": "ok.png", "conversations": conv("What?", "A thing.")},
        {"id": "tag", "conversations": conv("<image>\nWhat?", "A thing.")},
        {"id": "broken", "conversations": [{"from": "robot", "value": "x"}]},
        {"id": "long", "image": "ok.png", "conversations": conv("<image>\n" + "why " * 40, "A thing.")},
    ]
    (folder / "data.json").write_text(json.dumps(records))
    return folder / "data.json"


def test_validate_counts_problems_by_kind(tmp_path, session_tokenizer):
    data = write_broken_set(tmp_path)
    processor = tiny_processor(tiny_config(session_tokenizer), session_tokenizer)
    report = validate_dataset(data, tmp_path, "vicuna_v1", processor, max_length=processor.num_image_tokens + 60)
    assert report.problems == {
        "missing_image": 1,
        "unreadable_image": 1,
        "truncated_image": 1,
        "image_too_large": 1,
        "image_tag_mismatch": 2,
        "malformed_record": 1,
        "no_supervision": 1,
    }
    assert report.num_records == 12 and report.num_bad == 8
    assert report.converted == {"RGBA": 1, "I;16": 1}
    assert any("'gone'" in m for m in report.examples["missing_image"])


def test_cli_summary_and_exit_status(tmp_path, capsys):
    data = write_broken_set(tmp_path)
    assert main(["--data_path", str(data), "--image_folder", str(tmp_path), "--num_workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "12 records: 5 usable, 7 with problems" in out  # no tokenizer: the length problem is not checked
    assert "missing_image" in out and "image_tag_mismatch" in out and "converted to RGB (kept): " in out

    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps([json.loads(data.read_text())[i] for i in (0, 1, 3)]))
    assert main(["--data_path", str(clean), "--image_folder", str(tmp_path), "--template", "vicuna_v1"]) == 0
    assert "3 records: 3 usable, 0 with problems" in capsys.readouterr().out


def test_validator_and_training_count_the_same_records(tmp_path, capsys):
    """One malformed JSON line is a counted malformed record in both; the verdict is training's rule."""
    make_image(0).save(tmp_path / "ok.png")
    good = {"id": "ok", "image": "ok.png", "conversations": conv("<image>\nWhat?", "A thing.")}
    lines = [json.dumps(dict(good, id=f"r{i}")) for i in range(9)] + ['{"id": "cut", "conversations": [']
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    training = check_records(load_records(tmp_path / "d.jsonl"), get_template("vicuna_v1"), tmp_path)
    report = validate_dataset(tmp_path / "d.jsonl", tmp_path, "vicuna_v1")
    assert report.problems == training.dropped == {"malformed_record": 1}
    assert report.num_records == training.num_records == 10 and not report.training_stops
    assert main(["--data_path", str(tmp_path / "d.jsonl"), "--image_folder", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "10 records: 9 usable, 1 with problems" in out and "line 10 is not a JSON record" in out
    assert "training with max_bad_sample_fraction=0.05: skips them and runs (1 of 10 records bad, 10.0%" in out

    half = [json.dumps(dict(good, id=f"r{i}")) if i % 2 else "{oops" for i in range(20)]
    (tmp_path / "half.jsonl").write_text("\n".join(half))
    assert main(["--data_path", str(tmp_path / "half.jsonl"), "--image_folder", str(tmp_path)]) == 1
    assert "malformed_record" in (out := capsys.readouterr().out) and ": stops (10 of 20 records bad, 50.0%" in out


@pytest.mark.parametrize(
    ("text", "folder", "message"),
    [
        ("[]", ".", "holds no records"),
        ('[{"id": 1},', ".", "is not valid JSON"),
        (json.dumps([{"image": "a.png", "conversations": conv("<image>\nWhat?", "A thing.")}]), "gone", "not a folder"),
        (json.dumps([{"image": "a.png", "conversations": conv("<image>\nWhat?", "A thing.")}]), ".", "none of 1"),
    ],
)
def test_unusable_inputs_are_one_error_line(tmp_path, capsys, text, folder, message):
    (tmp_path / "d.json").write_text(text)
    assert main(["--data_path", str(tmp_path / "d.json"), "--image_folder", str(tmp_path / folder)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err and "Traceback" not in err
    with pytest.raises(Exception, match=message):
        main(["--data_path", str(tmp_path / "d.json"), "--image_folder", str(tmp_path / folder), "--debug"])
