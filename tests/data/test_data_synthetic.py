"""The generated visual-QA world: deterministic, in LLaVA's formats, answers derivable from the scene."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from PIL import Image

from llava_stf.data.conversation import normalize_record
from llava_stf.data.synthetic import (
    BACKGROUND,
    BLANK_SPLIT,
    COLORS,
    DETAIL,
    FAMILIES,
    Scene,
    answer_from_scene,
    generate,
    render,
    write_blank_split,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    counts = generate(out, num_train=40, num_eval=12, image_size=48, seed=3)
    return out, counts


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    out, _ = world
    generate(tmp_path / "again", num_train=40, num_eval=12, image_size=48, seed=3)
    assert _files(tmp_path / "again") == _files(out)
    generate(tmp_path / "other", num_train=40, num_eval=12, image_size=48, seed=4)
    assert (tmp_path / "other" / "scenes.jsonl").read_text() != (out / "scenes.jsonl").read_text()


def test_training_files_are_llava_json(world):
    out, counts = world
    for name in ("pretrain.json", "instruct.json"):
        records = json.loads((out / name).read_text())
        assert isinstance(records, list) and records
        for record in records:
            turns = normalize_record(record)  # raises on a malformed record
            if "image" in record:
                assert turns[0].text.startswith("<image>\n")
                with Image.open(out / record["image"]) as image:
                    assert image.size == (48, 48) and image.mode == "RGB"
    pretrain = json.loads((out / "pretrain.json").read_text())
    assert len(pretrain) == counts["pretrain"] == 40
    assert all(len(r["conversations"]) == 2 for r in pretrain)
    assert any("image" not in r for r in json.loads((out / "instruct.json").read_text()))  # text-only samples


def test_eval_questions_answers_follow_from_the_scene(world):
    out, _ = world
    scenes = {s["image"]: Scene.from_json(s) for s in map(json.loads, (out / "scenes.jsonl").read_text().splitlines())}
    questions = [json.loads(line) for line in (out / "eval/questions.jsonl").read_text().splitlines()]
    answers = {a["question_id"]: a for a in map(json.loads, (out / "eval/answers.jsonl").read_text().splitlines())}
    assert len({q["question_id"] for q in questions}) == len(questions) == len(answers)
    families = Counter()
    for q in questions:
        assert set(q) == {"question_id", "image", "text", "category"}
        truth = answers[q["question_id"]]
        assert truth["family"] == q["category"] in FAMILIES
        question = q["text"].split("\n")[0]
        assert answer_from_scene(scenes[q["image"]], q["category"], question) == truth["answer"]
        families[q["category"]] += 1
    assert set(families) == set(FAMILIES)
    existence = [answers[q["question_id"]]["answer"] for q in questions if q["category"] == "existence"]
    assert existence.count("yes") == existence.count("no")  # balanced, like POPE


def test_render_draws_what_the_scene_says():
    scene = Scene.from_json(
        {
            "image": "x.png",
            "objects": [{"shape": "square", "color": "red", "size": "large", "row": 0, "col": 0}],
            "label": None,
            "label_cell": None,
        }
    )
    image = render(scene, 60)
    assert image.getpixel((10, 10)) == (220, 40, 40)  # inside the top-left square
    assert image.getpixel((50, 50)) == (235, 235, 235)  # empty bottom-right cell


def test_blank_control_asks_the_same_questions_about_an_empty_canvas(world):
    out, _ = world
    real = [json.loads(line) for line in (out / "eval/questions.jsonl").read_text().splitlines()]
    blank = [json.loads(line) for line in (out / f"eval/{BLANK_SPLIT}.jsonl").read_text().splitlines()]
    assert [{**q, "image": None} for q in blank] == [{**q, "image": None} for q in real]
    assert {q["image"] for q in blank} == {"images/blank.png"}
    assert (out / "eval/answers_blank.jsonl").read_text() == (out / "eval/answers.jsonl").read_text()
    with Image.open(out / "images/blank.png") as image:
        assert image.size == (48, 48) and image.getcolors() == [(48 * 48, BACKGROUND)]
    # Rewritten from the current eval split (a world generated before the control existed gets it later).
    (out / f"eval/{BLANK_SPLIT}.jsonl").unlink()
    assert write_blank_split(out, 48).read_text().splitlines() == [json.dumps(q) for q in blank]


def test_detail_world_is_the_default_world_plus_one_tiny_dot_per_scene(world, tmp_path):
    out, _ = world
    counts = generate(tmp_path / "detail", num_train=40, num_eval=12, image_size=48, seed=3, detail=True)
    plain = [json.loads(line) for line in (out / "scenes.jsonl").read_text().splitlines()]
    dotted = [json.loads(line) for line in (tmp_path / "detail" / "scenes.jsonl").read_text().splitlines()]
    assert all("dot" not in s for s in plain)  # the default world's files do not change
    assert [{k: v for k, v in s.items() if k != "dot"} for s in dotted] == plain
    for record in dotted:
        scene = Scene.from_json(record)
        used = {(o.row, o.col) for o in scene.objects} | {scene.label_cell}
        assert scene.dot is not None and (scene.dot.row, scene.dot.col) not in used  # an empty cell
        cell = 48 / 3
        x, y = (scene.dot.col + 0.5 + scene.dot.dx) * cell, (scene.dot.row + 0.5 + scene.dot.dy) * cell
        with Image.open(tmp_path / "detail" / scene.image) as image:
            assert image.getpixel((int(x), int(y))) == COLORS[scene.dot.color]  # drawn where it says
            assert image.getpixel((int(x) + 4, int(y))) == BACKGROUND  # and tiny: 4 px away is background
    captions = json.loads((tmp_path / "detail" / "pretrain.json").read_text())
    assert all(f"A tiny {Scene.from_json(s).dot.color} dot is at the " in c["conversations"][1]["value"]
               for s, c in zip(dotted, captions))  # fmt: skip
    questions = [json.loads(x) for x in (tmp_path / "detail" / "eval" / "questions.jsonl").read_text().splitlines()]
    answers = [json.loads(x) for x in (tmp_path / "detail" / "eval" / "answers.jsonl").read_text().splitlines()]
    scenes = {s["image"]: Scene.from_json(s) for s in dotted}
    detail = [(q, a) for q, a in zip(questions, answers) if q["category"] == DETAIL]
    assert len(detail) == 12 and counts["eval_questions"] == 12 + len(
        (out / "eval" / "questions.jsonl").read_text().splitlines()
    )
    for q, a in detail:
        assert a["answer"] == scenes[q["image"]].dot.color == answer_from_scene(scenes[q["image"]], DETAIL, q["text"])
