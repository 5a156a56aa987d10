"""A generated visual-QA world in LLaVA's file formats: ``python -m llava_stf.data.synthetic --out DIR``.

Each image is a scene on a 3x3 grid: 1-4 coloured shapes (circle, square, triangle, diamond; small or large) and,
in some scenes, a two-character label (digits / capital letters) drawn small, so reading it needs fine detail.
With ``detail=True`` every scene also holds one tiny dot (6 % of the image side across, smaller than a
vision-tower patch) at a random place in an empty cell, asked about by the ``detail`` family ("What color is the
tiny dot?"): a small object whose colour a 4x token compression may blur. Off by default (the default world is
unchanged, file for file).
Everything is a pure function of ``(seed, split, index)``, so two runs write identical files.

Written files (the same formats as the real data, so every real code path is exercised):
- ``images/{split}_{i:06d}.png``
- ``pretrain.json``: stage-1 captions (LLaVA JSON list, 2 turns, ``<image>`` in the human turn)
- ``instruct.json``: stage-2 multi-turn instruction data (plus a few text-only samples)
- ``eval/questions.jsonl``: held-out questions in LLaVA's eval format (``question_id``, ``image``, ``text``,
  ``category`` = question family) and ``eval/answers.jsonl`` (``question_id``, ``answer``, ``family``)
- ``eval/questions_blank.jsonl`` and ``eval/answers_blank.jsonl``: the control split (``write_blank_split``), the
  same questions about one blank canvas ``images/blank.png``: what a model scores there comes from the question alone
- ``scenes.jsonl``: the scene description of every image, from which every answer can be derived
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
GRID = 3
POSITIONS = [["top left", "top", "top right"], ["left", "center", "right"], ["bottom left", "bottom", "bottom right"]]
LABEL_CHARS = "0123456789ABCDEFGHJKLMNPRSTUVWXYZ"
NUMBER_WORDS = ["zero", "one", "two", "three", "four"]
FAMILIES = ("color", "shape", "position", "count", "text", "existence")
DETAIL = "detail"  # the family of ``generate(detail=True)``'s tiny dot
ALL_FAMILIES = (*FAMILIES, DETAIL)
DOT_RADIUS = 0.03  # of the image side: 1.9 px at 64 px, a dot ~4 px across, half an 8-px patch
SHORT_ANSWER = "Answer the question using a single word or phrase."
BACKGROUND = (235, 235, 235)
BLANK_SPLIT = "questions_blank"  # question-file stem of the blank-image control (``write_blank_split``)


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    row: int
    col: int

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]


@dataclass(frozen=True)
class Dot:
    """The tiny dot of a ``detail`` world: its colour, cell and offset from the cell's centre (fractions of a cell)."""

    color: str
    row: int
    col: int
    dx: float
    dy: float

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]


@dataclass(frozen=True)
class Scene:
    image: str  # path relative to the output folder
    objects: tuple[Obj, ...]
    label: str | None  # two characters drawn small, or None
    label_cell: tuple[int, int] | None
    dot: Dot | None = None  # only in a ``detail`` world

    def to_json(self) -> dict:
        record = {
            "image": self.image,
            "objects": [asdict(o) for o in self.objects],
            "label": self.label,
            "label_cell": list(self.label_cell) if self.label_cell else None,
        }
        return record | ({"dot": asdict(self.dot)} if self.dot else {})

    @classmethod
    def from_json(cls, record: dict) -> Scene:
        cell, dot = record["label_cell"], record.get("dot")
        return cls(
            record["image"],
            tuple(Obj(**o) for o in record["objects"]),
            record["label"],
            tuple(cell) if cell else None,
            Dot(**dot) if dot else None,
        )


def sample_scene(rng: random.Random, image: str) -> Scene:
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], 5)
    n = rng.randint(1, 4)
    objects = tuple(Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES), *cells[i]) for i in range(n))
    has_label = rng.random() < 0.5
    label = "".join(rng.choice(LABEL_CHARS) for _ in range(2)) if has_label else None
    return Scene(image, objects, label, cells[4] if has_label else None)


def add_dot(scene: Scene, rng: random.Random) -> Scene:
    """``scene`` with a tiny dot of a random colour in one of its empty cells (no object, no label), off-centre."""
    used = {(o.row, o.col) for o in scene.objects} | ({scene.label_cell} if scene.label_cell else set())
    row, col = rng.choice([(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in used])
    dot = Dot(rng.choice(list(COLORS)), row, col, round(rng.uniform(-0.3, 0.3), 3), round(rng.uniform(-0.3, 0.3), 3))
    return replace(scene, dot=dot)


def object_box(obj: Obj, size: int) -> tuple[float, float, float]:
    """``(cx, cy, r)``: the centre and half-side of the square ``obj`` is drawn in on a ``size x size`` canvas."""
    cell = size / GRID
    return (obj.col + 0.5) * cell, (obj.row + 0.5) * cell, cell * (0.42 if obj.size == "large" else 0.24)


def render(scene: Scene, size: int) -> Image.Image:
    """Draw the scene on a ``size x size`` canvas."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size / GRID
    for obj in scene.objects:
        cx, cy, r = object_box(obj, size)
        box = [cx - r, cy - r, cx + r, cy + r]
        color = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse(box, fill=color)
        elif obj.shape == "square":
            draw.rectangle(box, fill=color)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    if scene.dot:
        d, r = scene.dot, max(1.0, size * DOT_RADIUS)
        cx, cy = (d.col + 0.5 + d.dx) * cell, (d.row + 0.5 + d.dy) * cell
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[d.color])
    if scene.label:
        font = ImageFont.load_default(size=max(6, round(cell * 0.45)))
        row, col = scene.label_cell
        draw.text(((col + 0.5) * cell, (row + 0.5) * cell), scene.label, fill=(0, 0, 0), font=font, anchor="mm")
    return image


def caption(scene: Scene) -> str:
    parts = [f"a {o.size} {o.color} {o.shape} at the {o.position}" for o in scene.objects]
    text = "There is " + ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1] + "."
    text += (
        f' The text "{scene.label}" is written at the {POSITIONS[scene.label_cell[0]][scene.label_cell[1]]}.'
        if scene.label
        else ""
    )
    return text + (f" A tiny {scene.dot.color} dot is at the {scene.dot.position}." if scene.dot else "")


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """``(family, question, answer)`` triples whose answers are unambiguous given the scene."""
    out: list[tuple[str, str, str]] = []
    by_shape = {s: [o for o in scene.objects if o.shape == s] for s in SHAPES}
    by_color = {c: [o for o in scene.objects if o.color == c] for c in COLORS}
    for obj in scene.objects:
        if len(by_shape[obj.shape]) == 1:
            out.append(("color", f"What color is the {obj.shape}?", obj.color))
        if len(by_color[obj.color]) == 1:
            out.append(("shape", f"What shape is the {obj.color} object?", obj.shape))
        if sum(o.shape == obj.shape and o.color == obj.color for o in scene.objects) == 1:
            out.append(("position", f"Where is the {obj.color} {obj.shape}?", obj.position))
    out.append(("count", "How many shapes are there?", str(len(scene.objects))))
    if scene.label:
        out.append(("text", "What text is written in the image?", scene.label))
    present = rng.choice(scene.objects)
    out.append(("existence", f"Is there a {present.color} {present.shape} in the image?", "yes"))
    absent = [(c, s) for c in COLORS for s in SHAPES if not any(o.color == c and o.shape == s for o in scene.objects)]
    color, shape = rng.choice(absent)
    out.append(("existence", f"Is there a {color} {shape} in the image?", "no"))
    if scene.dot:
        out.append((DETAIL, "What color is the tiny dot?", scene.dot.color))
    return out


def answer_text(answer: str) -> str:
    """An answer as the instruction records word it (``yes``/``no`` capitalised, as LLaVA's short answers)."""
    return answer.capitalize() if answer in ("yes", "no") else answer


def answer_from_scene(scene: Scene, family: str, question: str) -> str:
    """Recompute an answer from the scene description alone (used by tests and sanity checks)."""
    words = question.rstrip("?").split()
    if family == "count":
        return str(len(scene.objects))
    if family == "text":
        return scene.label or ""
    if family == DETAIL:
        return scene.dot.color if scene.dot else ""
    if family == "color":
        return next(o.color for o in scene.objects if o.shape == words[-1])
    if family == "shape":
        return next(o.shape for o in scene.objects if o.color == words[-2])
    if family == "position":
        return next(o.position for o in scene.objects if o.color == words[-2] and o.shape == words[-1])
    color, shape = words[3], words[4]
    return "yes" if any(o.color == color and o.shape == shape for o in scene.objects) else "no"


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    """The random source of scene ``index`` of ``split``: every scene is a pure function of these."""
    return random.Random(f"{seed}/{split}/{index}")


def generate(
    out: Path, num_train: int = 1000, num_eval: int = 200, image_size: int = 64, seed: int = 0, detail: bool = False
) -> dict:
    """Write the dataset under ``out`` (see the module docstring; ``detail``: a tiny dot per scene, drawn from its own
    random source so that everything else is the default world's); returns counts per file."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    pretrain, instruct, eval_q, eval_a, scenes = [], [], [], [], []
    for split, count in (("train", num_train), ("eval", num_eval)):
        for i in range(count):
            rng = scene_rng(seed, split, i)
            scene = sample_scene(rng, f"images/{split}_{i:06d}.png")
            if detail:
                scene = add_dot(scene, random.Random(f"{seed}/{split}/{i}/{DETAIL}"))
            render(scene, image_size).save(out / scene.image)
            scenes.append(scene.to_json())
            qa = questions(scene, rng)
            if split == "train":
                pretrain.append(
                    {
                        "id": f"cap_{i}",
                        "image": scene.image,
                        "conversations": [
                            {"from": "human", "value": "<image>\nDescribe the image briefly."},
                            {"from": "gpt", "value": caption(scene)},
                        ],
                    }
                )
                turns = rng.sample(qa, min(len(qa), rng.randint(1, 3)))
                conv = []
                for k, (_family, q, a) in enumerate(turns):
                    conv.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + f"{q}\n{SHORT_ANSWER}"})
                    conv.append({"from": "gpt", "value": answer_text(a)})
                instruct.append({"id": f"qa_{i}", "image": scene.image, "conversations": conv})
                if i % 10 == 0:  # text-only samples, as in LLaVA's mix
                    n = rng.randint(1, 4)
                    instruct.append(
                        {
                            "id": f"text_{i}",
                            "conversations": [
                                {"from": "human", "value": f"What number comes after {NUMBER_WORDS[n - 1]}?"},
                                {"from": "gpt", "value": NUMBER_WORDS[n].capitalize() + "."},
                            ],
                        }
                    )
            else:
                for k, (family, q, a) in enumerate(qa):
                    qid = f"{i:06d}_{k}"
                    eval_q.append(
                        {"question_id": qid, "image": scene.image, "text": f"{q}\n{SHORT_ANSWER}", "category": family}
                    )
                    eval_a.append({"question_id": qid, "answer": a, "family": family})
    (out / "pretrain.json").write_text(json.dumps(pretrain, indent=1))
    (out / "instruct.json").write_text(json.dumps(instruct, indent=1))
    for name, rows in (("eval/questions.jsonl", eval_q), ("eval/answers.jsonl", eval_a), ("scenes.jsonl", scenes)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_blank_split(out, image_size)
    return {"pretrain": len(pretrain), "instruct": len(instruct), "eval_questions": len(eval_q), "images": len(scenes)}


def write_blank_split(out: Path, image_size: int, color: tuple[int, int, int] = BACKGROUND) -> Path:
    """Write the blank-image control of ``out/eval/questions.jsonl``: every question with its image replaced by one
    background-only canvas (``images/blank.png``), into ``eval/questions_blank.jsonl`` + ``eval/answers_blank.jsonl``
    (same ids and answers). Accuracy there is what a model gets without looking, so accuracy on the real split minus
    this is what it reads from the image. Rewrites the files from the current eval split; returns the question file.
    ``color``: the canvas (another world's background: the demo's ``--data``).
    """
    questions = [json.loads(line) for line in (out / "eval" / "questions.jsonl").read_text().splitlines()]
    Image.new("RGB", (image_size, image_size), color).save(out / "images" / "blank.png")
    rows = "".join(json.dumps({**q, "image": "images/blank.png"}) + "\n" for q in questions)
    (out / "eval" / f"{BLANK_SPLIT}.jsonl").write_text(rows)
    answers = (out / "eval" / "answers.jsonl").read_text()
    (out / "eval" / f"{BLANK_SPLIT.replace('questions', 'answers')}.jsonl").write_text(answers)
    return out / "eval" / f"{BLANK_SPLIT}.jsonl"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("playground/synthetic"))
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-eval", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--detail", action="store_true", help="a tiny dot per scene and its question family")
    args = parser.parse_args(argv)
    counts = generate(args.out, args.num_train, args.num_eval, args.image_size, args.seed, args.detail)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
