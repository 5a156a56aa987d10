"""The world the demo learns: its generated one, or any LLaVA-format folder (``--data DIR``), as one ``World``.

A ``World`` names the files every step reads (captions, instructions, questions, ground truth, images relative to
``root``), the image size the vision tower is built for, the cache keys the steps' markers hold, and how the
evaluation engine scores it (the ``synthetic`` benchmark for the generated world; the ``vqa`` benchmark, the same
exact-match scorer per category, for a folder of one's own).

A user folder is read only, never written: ``load_world`` checks it (one ``UserError`` line per problem: missing
folder or file, malformed JSON, a record naming a missing image, images of different or non-square sizes, questions
without an answer or answers without a question) and copies the question and answer files, with the blank-image
control, into a staging folder under ``--out`` (the engine writes model answers next to the question file). The cache
keys are content digests of the files and of every image they name, so an edited file re-runs the steps that read it
and an unchanged folder reuses them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.synthetic import BLANK_SPLIT, write_blank_split
from ..errors import UserError
from ..eval.benchmarks.base import QUESTION_FIELDS, read_records
from ..eval.benchmarks.vqa import read_ground_truth
from ..provenance import file_digest as content_digest

# The files of a user world, relative to DIR unless given as absolute paths (flag name -> default).
FILES = {"pretrain": "pretrain.json", "finetune": "finetune.json", "questions": "eval/questions.jsonl",
         "answers": "eval/answers.jsonl"}  # fmt: skip
ANSWER_TOKENS = 16  # generation limit, as the synthetic benchmark's: exact-match answers are a few words
GRID = 8  # patches per side: the tower's patch size is image_size // 8, the 8 x 8 grid of the demo's 64-px world


@dataclass(frozen=True)
class World:
    """Where a world's files are and what the demo's cached steps key on."""

    root: Path  # images are named relative to this folder
    pretrain: Path  # caption conversations: vision tower, LLM pre-training, stage 1
    finetune: Path  # instruction conversations: LLM pre-training, stage 2
    questions: Path  # held-out questions (a staged copy for a user world)
    answers: Path  # their ground truth
    image_size: int  # every image is image_size x image_size pixels
    keys: dict[str, str]  # "captions" (vision tower), "text" (LLM), "train" (stages): digests of what they read
    staged: Path | None = None  # a user world's staging folder under --out; None: the generated world

    def eval_argv(self, blank: bool = False) -> list[str]:
        """The evaluation engine's flags for the held-out questions (``blank``: the blank-image control)."""
        split = BLANK_SPLIT if blank else "questions"
        if self.staged is None:
            return ["--benchmark", "synthetic", "--data-root", str(self.root.parent), "--split", split]
        eval_dir = self.staged / "eval"
        return ["--benchmark", "vqa", "--questions", str(eval_dir / f"{split}.jsonl"), "--image-folder",
                str(self.staged if blank else self.root), "--ground-truth",
                str(eval_dir / f"{split.replace('questions', 'answers')}.jsonl"),
                "--max-new-tokens", str(ANSWER_TOKENS)]  # fmt: skip


def digest(marker: Path) -> str:
    """The short content digest the demo's step markers record for ``marker`` (a file)."""
    return hashlib.sha256(marker.read_bytes()).hexdigest()[:16]


def generated_world(folder: Path, image_size: int) -> World:
    """The world ``data.synthetic.generate`` wrote to ``folder`` (its marker ``demo_data.json`` is every key)."""
    key = digest(folder / "demo_data.json")
    keys = dict.fromkeys(("captions", "text", "train"), key)
    return World(folder, folder / "pretrain.json", folder / "instruct.json", folder / "eval" / "questions.jsonl",
                 folder / "eval" / "answers.jsonl", image_size, keys)  # fmt: skip


def patch_size(image_size: int) -> int:
    """The vision tower's patch size for ``image_size``-px images: an 8 x 8 patch grid whatever the size."""
    if image_size % GRID or image_size < 2 * GRID:
        raise UserError(f"images are {image_size} px: the demo's tower cuts them into an {GRID} x {GRID} grid of "
                        f"patches, so their size must be a multiple of {GRID} (at least {2 * GRID})")  # fmt: skip
    return image_size // GRID


def _digest(parts: Iterable[str | bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _conversations(path: Path) -> list[dict[str, Any]]:
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(records, list) or not records:
        raise UserError(f"{path}: expected a non-empty JSON list of LLaVA records")
    bad = [i for i, r in enumerate(records) if not isinstance(r, dict) or not r.get("conversations")]
    if bad:
        raise UserError(f"{path}: {len(bad)} record(s) without 'conversations', e.g. record {bad[0]}")
    return records


def _images(root: Path, path: Path, records: list[dict[str, Any]]) -> list[str]:
    """The images ``records`` name (relative to ``root``); an error counting the records whose image is missing."""
    named = [str(r["image"]) for r in records if r.get("image")]
    missing = [n for n in named if not (root / n).is_file()]
    if missing:
        raise UserError(f"{path}: {len(missing)} of {len(records)} records name images that do not exist under "
                        f"{root}, e.g. {missing[0]}")  # fmt: skip
    return named


def load_world(data: Path, staged: Path, files: dict[str, Path | None]) -> World:
    """Check the LLaVA-format folder ``data`` and stage its evaluation files (+ blank control) in ``staged``.

    Args:
        data: The user's folder (read only).
        staged: A folder under ``--out`` for the copies of the question and answer files and the blank control.
        files: ``FILES`` keys to paths (relative to ``data`` or absolute); None: the default name.

    Raises:
        UserError: Naming the folder, file or record that is wrong (see the module docstring).
    """
    if not data.is_dir():
        raise UserError(f"--data {data}: no such folder")
    paths = {}
    for key, default in FILES.items():
        path = data / (files.get(key) or default)  # an absolute path replaces data
        if not path.is_file():
            raise UserError(f"--{key}-file {path}: no such file" if key in ("pretrain", "finetune")
                            else f"--{key} {path}: no such file")  # fmt: skip
        paths[key] = path
    records = {k: _conversations(paths[k]) for k in ("pretrain", "finetune")}
    questions = read_records(paths["questions"], QUESTION_FIELDS)
    if not questions:
        raise UserError(f"{paths['questions']}: no questions")
    qids = [q["question_id"] for q in questions]
    read_ground_truth(paths["answers"], qids)  # every question has an answer
    extra = {str(r["question_id"]) for r in read_records(paths["answers"], ("question_id", "answer"))} - set(
        map(str, qids)
    )
    if extra:
        raise UserError(f"{paths['answers']}: {len(extra)} answer(s) for questions not in {paths['questions']}, "
                        f"e.g. ids {sorted(extra)[:5]}")  # fmt: skip
    named = {k: _images(data, paths[k], records[k]) for k in ("pretrain", "finetune")}
    named["questions"] = _images(data, paths["questions"], questions)
    if not named["pretrain"]:
        raise UserError(f"{paths['pretrain']}: no record names an image: the vision tower needs captioned images")
    first, sizes = named["pretrain"][0], {}
    for name in dict.fromkeys(n for group in named.values() for n in group):
        with Image.open(data / name) as image:
            sizes[name] = image.size
        if sizes[name] != sizes[first]:  # one size: the tower's resolution and the blank canvas are the world's
            raise UserError(
                f"images of different sizes: {data / first} is {sizes[first][0]}x{sizes[first][1]}, "
                f"{data / name} is {sizes[name][0]}x{sizes[name][1]} (the demo needs one image size)"
            )
    width, height = sizes[first]
    if width != height:
        raise UserError(f"{data / first} is {width}x{height}: the demo's tower needs square images")
    patch_size(width)  # fails now, before any work, when no 8 x 8 grid fits

    image_digest = {n: content_digest(data / n) for n in sizes}
    file_digest = {k: content_digest(p) for k, p in paths.items()}
    caption_images = [image_digest[n] for n in named["pretrain"]]
    keys = {
        "captions": _digest([file_digest["pretrain"], *caption_images]),
        "text": _digest([file_digest["pretrain"], file_digest["finetune"]]),
        "train": _digest(
            [
                file_digest["pretrain"],
                file_digest["finetune"],
                *caption_images,
                *(image_digest[n] for n in named["finetune"]),
            ]
        ),  # fmt: skip
    }
    (staged / "eval").mkdir(parents=True, exist_ok=True)
    (staged / "images").mkdir(exist_ok=True)
    shutil.copyfile(paths["questions"], staged / "eval" / "questions.jsonl")
    shutil.copyfile(paths["answers"], staged / "eval" / "answers.jsonl")
    with Image.open(data / first) as image:  # the canvas: the first image's most common colour (its background)
        colors = image.convert("RGB").getcolors(width * height)
    write_blank_split(staged, width, color=max(colors)[1])
    marker = {"data": str(data), "files": {k: str(p) for k, p in paths.items()}, "image_size": width,
              "digests": file_digest, "keys": keys}  # fmt: skip
    (staged / "demo_data.json").write_text(json.dumps(marker, indent=1))
    return World(data, paths["pretrain"], paths["finetune"], staged / "eval" / "questions.jsonl",
                 staged / "eval" / "answers.jsonl", width, keys, staged)  # fmt: skip


__all__ = ["FILES", "GRID", "World", "digest", "generated_world", "load_world", "patch_size"]
