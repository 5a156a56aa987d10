"""Builders for the evaluation tests: 3-5 question layouts per benchmark in LLaVA's formats (the tiny checkpoint
fixture is in this folder's ``conftest.py``; this module has its own name so test files can import it unambiguously).

Each ``make_<benchmark>(root)`` writes the files LLaVA-1.5's ``playground/data/eval/<bench>/`` holds (question file,
images, ground truth) for a handful of questions and returns the question texts in file order.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from llava_stf.testing import make_image

SHORT = "\nAnswer the question using a single word or phrase."
VIZWIZ = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT


def save_image(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(seed, size).save(path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def make_gqa(root: Path) -> list[dict]:
    folder = root / "gqa"
    questions = [
        {"question_id": "201307251", "image": "n161313.jpg", "text": "Is it overcast?" + SHORT, "category": "default"},
        {"question_id": "201640614", "image": "n235859.jpg", "text": "Who is wearing a dress?" + SHORT},
        {"question_id": "202225914", "image": "n161313.jpg", "text": "Does the tree look green?" + SHORT},
    ]
    for i, name in enumerate(["n161313.jpg", "n235859.jpg"]):
        save_image(folder / "data" / "images" / name, i)
    write_jsonl(folder / "llava_gqa_testdev_balanced.jsonl", questions)
    gold = {"201307251": "no", "201640614": "woman", "202225914": "yes", "999": "yes"}
    balanced = {qid: {"answer": a, "isBalanced": qid != "999", "question": "?"} for qid, a in gold.items()}
    write_json(folder / "data" / "testdev_balanced_questions.json", balanced)
    return questions


def make_sqa(root: Path) -> list[dict]:
    folder = root / "scienceqa"
    value = "<image>\nContext: Select the best answer.\nWhich animal is a mammal?\nA. shark\nB. whale"
    questions = [
        {"id": "4", "image": "4/image.png", "conversations": [{"from": "human", "value": value}]},
        {"id": "7", "conversations": [{"from": "human", "value": "Which is a verb?\nA. run\nB. blue\nC. cat"}]},
        {"id": "9", "image": "9/image.png", "conversations": [{"from": "human", "value": "Which is red?\nA. x\nB. y"}]},
    ]
    save_image(folder / "images" / "test" / "4" / "image.png", 3)
    save_image(folder / "images" / "test" / "9" / "image.png", 4, (20, 50))
    write_json(folder / "llava_test_CQM-A.json", questions)
    problems = {
        "4": {"choices": ["shark", "whale"], "answer": 1, "split": "test"},
        "7": {"choices": ["run", "blue", "cat"], "answer": 0, "split": "test"},
        "9": {"choices": ["x", "y"], "answer": 0, "split": "test"},
        "11": {"choices": ["a", "b"], "answer": 0, "split": "val"},
    }
    write_json(folder / "problems.json", problems)
    write_json(folder / "pid_splits.json", {"test": ["4", "7", "9"], "val": ["11"]})
    return questions


def make_textvqa(root: Path) -> list[dict]:
    folder = root / "textvqa"
    ocr = "\nReference OCR token: nikon, coolpix"
    questions = [  # question_id is the image id; two questions share an image
        {
            "question_id": "003a8ae2ef43b901",
            "image": "003a8ae2ef43b901.jpg",
            "text": "what brand is this?" + ocr + SHORT,
        },
        {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg", "text": "what is written?" + ocr + SHORT},
        {"question_id": "00c359f294f7dcd9", "image": "00c359f294f7dcd9.jpg", "text": "what number is it?" + SHORT},
    ]
    save_image(folder / "train_images" / "003a8ae2ef43b901.jpg", 5)
    save_image(folder / "train_images" / "00c359f294f7dcd9.jpg", 6)
    write_jsonl(folder / "llava_textvqa_val_v051_ocr.jsonl", questions)
    data = [
        {"image_id": "003a8ae2ef43b901", "question": "What brand is this?", "answers": ["nikon"] * 10},
        {"image_id": "003a8ae2ef43b901", "question": "what is written?", "answers": ["coolpix"] * 2 + ["x"] * 8},
        {"image_id": "00c359f294f7dcd9", "question": "what number is it?", "answers": ["ten"] + ["9"] * 9},
    ]
    write_json(folder / "TextVQA_0.5.1_val.json", {"data": data})
    return questions


def make_pope(root: Path) -> list[dict]:
    folder = root / "pope"
    spec = [  # (category, image, object, label)
        ("adversarial", "COCO_val2014_000000310196.jpg", "snowboard", "yes"),
        ("adversarial", "COCO_val2014_000000310196.jpg", "dining table", "no"),
        ("popular", "COCO_val2014_000000210789.jpg", "person", "yes"),
        ("random", "COCO_val2014_000000210789.jpg", "giraffe", "no"),
        ("random", "COCO_val2014_000000429109.jpg", "car", "yes"),
    ]
    questions = []
    for qid, (category, image, obj, _) in enumerate(spec, 1):
        text = f"Is there a {obj} in the image?" + SHORT
        questions.append({"question_id": qid, "image": image, "text": text, "category": category})
        save_image(folder / "val2014" / image, qid % 3)
    write_jsonl(folder / "llava_pope_test.jsonl", questions)
    for category in ("adversarial", "popular", "random"):
        labels = [  # the label files number their own questions and list them in another order
            {"question_id": n, "image": image, "text": f"Is there a {obj} in the image?", "label": label}
            for n, (c, image, obj, label) in enumerate(reversed(spec), 1)
            if c == category
        ]
        write_jsonl(folder / "coco" / f"coco_pope_{category}.json", labels)
    return questions


def _b64_png(seed: int) -> str:
    buffer = io.BytesIO()
    make_image(seed, (36, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


MMBENCH_COLUMNS = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "image",
    "source",
    "l2-category",
    "comment",
    "split",
]


def make_mmbench(
    root: Path, folder: str = "mmbench", split: str = "mmbench_dev_20230712", answers: bool = True
) -> list[dict]:
    rows = [
        {"index": 0, "question": "What is the main color?", "hint": "nan", "A": "red", "B": "green", "C": "blue",
         "D": "nan", "answer": "C"},
        {"index": 1, "question": "How many dogs?", "hint": "Look closely.", "A": "one", "B": "two", "C": "",
         "D": "", "answer": "A"},
        {"index": 2, "question": "Which season?", "hint": "", "A": "winter", "B": "spring", "C": "summer",
         "D": "autumn", "answer": "D"},
    ]  # fmt: skip
    columns = [c for c in MMBENCH_COLUMNS if answers or c != "answer"]  # test splits have no answer column
    lines = ["\t".join(columns)]
    for i, row in enumerate(rows):
        full = {
            **row,
            "category": "attr",
            "image": _b64_png(10 + i),
            "source": "src",
            "l2-category": "l2",
            "comment": "",
            "split": "dev",
        }
        lines.append("\t".join(str(full[c]) for c in columns))
    path = root / folder / f"{split}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rows


def make_vqav2(root: Path) -> list[dict]:
    folder = root / "vqav2"
    questions = [
        {"question_id": 262144000, "image": "COCO_test2015_000000262144.jpg", "text": "What is he doing?" + SHORT},
        {"question_id": 262144001, "image": "COCO_test2015_000000262144.jpg", "text": "How many people?" + SHORT},
        {"question_id": 262145000, "image": "COCO_test2015_000000262145.jpg", "text": "Is it raining?" + SHORT},
    ]
    for i, name in enumerate(sorted({q["image"] for q in questions})):
        save_image(folder / "test2015" / name, 20 + i)
    write_jsonl(folder / "llava_vqav2_mscoco_test-dev2015.jsonl", questions)
    full = [questions[0], {"question_id": 100, "image": "x.jpg", "text": "?"}, *questions[1:]]
    write_jsonl(folder / "llava_vqav2_mscoco_test2015.jsonl", full)
    return questions


def make_vizwiz(root: Path) -> list[dict]:
    folder = root / "vizwiz"
    questions = [
        {"question_id": i, "image": f"VizWiz_test_{i:08d}.jpg", "text": q + VIZWIZ}
        for i, q in enumerate(["What is this?", "What color is this shirt?", "Can you read the label?"])
    ]
    for i, q in enumerate(questions):
        save_image(folder / "test" / q["image"], 30 + i)
    write_jsonl(folder / "llava_test.jsonl", questions)
    return questions


def make_mme(root: Path) -> list[dict]:
    folder = root / "MME"
    release = folder / "MME_Benchmark_release_version"
    # existence: images and .txt side by side; artwork: images/ + questions_answers_YN/ (two release layouts).
    save_image(release / "existence" / "000000006040.jpg", 40)
    (release / "existence" / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n"
    )
    save_image(release / "artwork" / "images" / "10002.jpg", 41)
    (release / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (release / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by Titian? Please answer yes or no.\tYes\n"
        "Is this artwork created by Monet?  Please answer yes or no.\tNo\n"  # two spaces, as in some release files
    )
    questions = [
        {"question_id": "existence/000000006040.jpg", "image": "existence/000000006040.jpg",
         "text": "Is there a train in this image?" + SHORT, "category": "existence"},
        {"question_id": "existence/000000006040.jpg", "image": "existence/000000006040.jpg",
         "text": "Is there a bed in this image?" + SHORT, "category": "existence"},
        {"question_id": "artwork/10002.jpg", "image": "artwork/images/10002.jpg",
         "text": "Is this artwork created by Titian?" + SHORT, "category": "artwork"},
        {"question_id": "artwork/10002.jpg", "image": "artwork/images/10002.jpg",
         "text": "Is this artwork created by Monet?" + SHORT, "category": "artwork"},
    ]  # fmt: skip
    write_jsonl(folder / "llava_mme.jsonl", questions)
    return questions
