"""``python -m llava_stf.demo --data DIR`` on a LLaVA-format world the demo has never seen (issue 17, item 2).

The world is written here, not by the package: 48-px tiles, striped or dotted, in one of three tints, with
captions, multi-turn and text-only instructions, and held-out questions in two categories of its own (``pattern``,
``tint``). The run must score those categories (and the blank-image control) under ``--out``, leave DIR untouched,
reuse every step when nothing changed, and re-run from the LLM pre-training on when one answer of ``finetune.json``
changes (the vision tower reads only the captions and their images). Bad folders are one ``error:`` line.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from llava_stf.demo.__main__ import main
from llava_stf.demo.pipeline import FAST, run_pipeline

TINTS = {"teal": (0, 128, 128), "maroon": (128, 0, 0), "olive": (128, 128, 0)}
SIZE = 48


def tile(pattern: str, tint: str) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    for k in range(0, SIZE, 8):
        if pattern == "striped":
            draw.rectangle([0, k, SIZE - 1, k + 3], fill=TINTS[tint])
        else:
            for x in range(2, SIZE, 8):
                draw.ellipse([x, k + 2, x + 3, k + 5], fill=TINTS[tint])
    return image


def make_world(root: Path, num_train: int = 24, num_eval: int = 4, seed: int = 1) -> Path:
    """A LLaVA-format folder: pretrain.json, finetune.json, pics/*.png, eval/questions.jsonl + answers.jsonl."""
    rng = random.Random(seed)
    (root / "pics").mkdir(parents=True)
    (root / "eval").mkdir()
    pretrain, finetune, questions, answers = [], [], [], []
    for i in range(num_train + num_eval):
        pattern, tint = rng.choice(["striped", "dotted"]), rng.choice(sorted(TINTS))
        image = f"pics/tile{i:03d}.png"
        tile(pattern, tint).save(root / image)
        if i < num_train:
            pretrain.append({"id": f"c{i}", "image": image, "conversations": [
                {"from": "human", "value": "<image>\nDescribe the tile."},
                {"from": "gpt", "value": f"A {tint} {pattern} tile."}]})  # fmt: skip
            finetune.append({"id": f"f{i}", "image": image, "conversations": [
                {"from": "human", "value": "<image>\nIs the tile striped or dotted?"},
                {"from": "gpt", "value": pattern},
                {"from": "human", "value": "Which tint does it have?"},
                {"from": "gpt", "value": tint}]})  # fmt: skip
            continue
        for category, text, answer in (("pattern", "Striped or dotted?", pattern), ("tint", "Its tint?", tint)):
            qid = f"{category}-{i}"
            questions.append({"question_id": qid, "image": image, "text": f"{text}\nAnswer with one word.",
                              "category": category})  # fmt: skip
            answers.append({"question_id": qid, "answer": answer, "category": category})
    finetune.append({"id": "t0", "conversations": [{"from": "human", "value": "Name a tint."},
                                                   {"from": "gpt", "value": "teal"}]})  # fmt: skip
    (root / "pretrain.json").write_text(json.dumps(pretrain))
    (root / "finetune.json").write_text(json.dumps(finetune))
    (root / "eval" / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (root / "eval" / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    return root


def folder_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


def mtimes(out: Path, run: str) -> dict[str, int]:
    """When each step last wrote its marker (or its answers' part file): unchanged means reused."""
    files = ["vision/demo_vision.json", "llm-seed0/demo_llm.json", f"{run}/stage1/demo_stage.json",
             f"{run}/stage2/demo_stage.json", f"data/eval/answers/questions/{run}.jsonl.parts/1_0.jsonl"]  # fmt: skip
    return {f: (out / f).stat().st_mtime_ns for f in files}


@pytest.mark.slow
def test_data_dir_runs_the_recipe_scores_its_categories_and_reuses_by_content(tmp_path, capsys) -> None:
    world, out = make_world(tmp_path / "tiles"), tmp_path / "out"
    before = folder_digest(world)
    assert main(["--data", str(world), "--out", str(out), "--fast", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert all(f"[{i}/6]" in printed for i in range(1, 7)) and "48 px images" in printed
    assert "    pattern" in printed and "    tint" in printed and "chat: USER 'Striped or dotted?'" in printed
    assert "'train_runtime'" not in printed  # one line per stage, not transformers' log dicts
    assert folder_digest(world) == before  # the user's folder is never written

    run = "mbtf_stf-seed0-fast"
    [(key, entry)] = json.loads((out / "results" / run / "results.json").read_text())["benchmarks"].items()
    [(_, blank)] = json.loads((out / "results" / f"{run}-blank" / "results.json").read_text())["benchmarks"].items()
    for metrics in (entry["metrics"], blank["metrics"]):
        assert metrics["questions"] == 8 and metrics["questions_pattern"] == metrics["questions_tint"] == 4
        assert {"accuracy", "accuracy_pattern", "accuracy_tint"} <= set(metrics)
    assert key.startswith("vqa/")
    assert Image.open(out / "data" / "images" / "blank.png").size == (SIZE, SIZE)
    tower = json.loads((out / "vision" / "config.json").read_text())["vision_config"]
    assert (tower["image_size"], tower["patch_size"]) == (SIZE, SIZE // 8)

    # Unchanged folder: every step reused (no marker or answer file rewritten).
    first = mtimes(out, run)
    again = run_pipeline(out, FAST, name=run, progress=False, data=world)
    assert again.reused == {"stage1": True, "stage2": True} and mtimes(out, run) == first
    assert again.metrics == entry["metrics"]

    # One answer of finetune.json edited: the vision tower is reused, the LLM and both stages run again.
    records = json.loads((world / "finetune.json").read_text())
    records[0]["conversations"][1]["value"] = "checked"
    (world / "finetune.json").write_text(json.dumps(records))
    edited = run_pipeline(out, FAST, name=run, progress=False, data=world)
    now = mtimes(out, run)
    assert edited.reused == {"stage1": False, "stage2": False}
    assert [now[f] == first[f] for f in first] == [True, False, False, False, False]


@pytest.fixture
def world(tmp_path) -> Path:
    return make_world(tmp_path / "tiles", num_train=4, num_eval=2)


def _error(capsys, world: Path, *argv) -> str:
    assert main(["--data", str(world), "--out", str(world.parent / "out"), "--fast", *map(str, argv)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (world.parent / "out" / "vision").exists()  # nothing was trained
    return err.strip()


def test_a_missing_folder_or_file_is_one_line(world, capsys) -> None:
    assert _error(capsys, world.parent / "nope") == f"error: --data {world.parent / 'nope'}: no such folder"
    (world / "finetune.json").rename(world / "instruct.json")
    assert _error(capsys, world) == f"error: --finetune-file {world / 'finetune.json'}: no such file"
    assert _error(capsys, world, "--questions", "eval/q.jsonl", "--finetune-file", "instruct.json") == (
        f"error: --questions {world / 'eval' / 'q.jsonl'}: no such file"
    )


def test_file_flags_need_a_data_folder(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "out"), "--questions", "q.jsonl"])
    assert exit_.value.code == 2 and "name files of --data DIR" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_images_mixed_sizes_and_stray_answers_are_one_line(world, capsys) -> None:
    (world / "pics" / "tile001.png").unlink()
    assert _error(capsys, world) == (
        f"error: {world / 'pretrain.json'}: 1 of 4 records name images that do not exist under {world}, "
        "e.g. pics/tile001.png"
    )
    Image.new("RGB", (SIZE + 8, SIZE + 8)).save(world / "pics" / "tile001.png")
    assert _error(capsys, world) == (
        f"error: images of different sizes: {world / 'pics/tile000.png'} is 48x48, {world / 'pics/tile001.png'} is "
        "56x56 (the demo needs one image size)"
    )
    tile("striped", "teal").save(world / "pics" / "tile001.png")
    with (world / "eval" / "answers.jsonl").open("a") as f:
        f.write(json.dumps({"question_id": "ghost", "answer": "teal"}) + "\n")
    assert _error(capsys, world) == (
        f"error: {world / 'eval' / 'answers.jsonl'}: 1 answer(s) for questions not in "
        f"{world / 'eval' / 'questions.jsonl'}, e.g. ids ['ghost']"
    )


def test_an_out_folder_inside_the_data_and_odd_sizes_are_refused(world, capsys) -> None:
    assert main(["--data", str(world), "--out", str(world / "out"), "--fast"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: --out {world / 'out'} is inside --data {world}: the demo never writes into the data folder"
    )
    for path in (world / "pics").iterdir():
        Image.new("RGB", (50, 50)).save(path)
    assert _error(capsys, world) == (
        "error: images are 50 px: the demo's tower cuts them into an 8 x 8 grid of patches, so their size must be a "
        "multiple of 8 (at least 16)"
    )
