"""Can a tiny from-scratch Llama learn to look an attribute up in image tokens? A 2-minute experiment.

The demo's miniature stalls where its LLM has to bind a word of the question to the image token that carries it
("What color is the circle?"). This script strips everything else away: no vision tower (each image is a
sequence of *oracle* tokens, one-hot colour / shape / size / presence and grid cell of the object under a cell or
patch, read from the generated scene), a 2-layer MLP projector, and transformers' ``LlamaModel`` at the demo's
size (2 layers, width 128, 4 heads of 32, 2 KV heads), trained from random init on the generator's questions
(``llava_stf.data.synthetic``; the text family is left out: the oracle tokens carry no label). It measures what
the recipe, not the features, allows: batch size, image tokens per image, prompt length, finite data, multi-turn
records. Findings: ``docs/demo-compare/miniature-limits.md``.

    python scripts/binding_toy.py                      # 9 tokens, short prompt, batch 64: 84 % after 1,500 steps
    python scripts/binding_toy.py --tokens 4           # 16 tokens: 98 % after 1,500 steps (4 min, one core)
    python scripts/binding_toy.py --batch 16 --steps 4000
    python scripts/binding_toy.py --tokens 8 --prompt llava --scenes 6000 --turns 3
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from llava_stf.data.synthetic import COLORS, GRID, SHAPES, SIZES, Scene, object_box, questions, sample_scene
from llava_stf.data.tokenization import IGNORE_INDEX

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER:"
)
SUFFIX = "Answer the question using a single word or phrase. ASSISTANT:"
# One-hot layout of an image token: colour, shape, size, "an object is here", the object's cell row and column.
SHAPE_AT = len(COLORS)
SIZE_AT = SHAPE_AT + len(SHAPES)
PRESENT_AT = SIZE_AT + len(SIZES)
ROW_AT = PRESENT_AT + 1
COL_AT = ROW_AT + GRID
ATTRS = COL_AT + GRID


class Words:
    """Word-level vocabulary grown on first sight (the toy has no tokenizer to train)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {"<pad>": 0}

    def __call__(self, text: str) -> list[int]:
        for mark in "?.,:":
            text = text.replace(mark, f" {mark}")
        return [self.ids.setdefault(word, len(self.ids)) for word in text.split()]


def object_code(vector: torch.Tensor, obj) -> None:
    """Write one object's one-hot attributes and cell into ``vector`` (ATTRS,)."""
    vector[list(COLORS).index(obj.color)] = 1
    vector[SHAPE_AT + SHAPES.index(obj.shape)] = 1
    vector[SIZE_AT + SIZES.index(obj.size)] = 1
    vector[PRESENT_AT] = vector[ROW_AT + obj.row] = vector[COL_AT + obj.col] = 1


def oracle_tokens(scene: Scene, grid: int) -> torch.Tensor:
    """(grid*grid, ATTRS + 2*grid) per patch: the object under it (drawn box overlap, 64-px canvas) + patch row/col;
    ``grid`` 0: one token per scene cell (GRID*GRID, ATTRS), its cell marked even when empty."""
    if grid == 0:
        tokens = torch.zeros(GRID * GRID, ATTRS)
        for r in range(GRID):
            for c in range(GRID):
                tokens[r * GRID + c, ROW_AT + r] = tokens[r * GRID + c, COL_AT + c] = 1
        for obj in scene.objects:
            object_code(tokens[obj.row * GRID + obj.col], obj)
        return tokens
    patch = 64 / grid
    tokens = torch.zeros(grid * grid, ATTRS + 2 * grid)
    for pr in range(grid):
        for pc in range(grid):
            vector = tokens[pr * grid + pc]
            vector[ATTRS + pr] = vector[ATTRS + grid + pc] = 1
            x, y = (pc + 0.5) * patch, (pr + 0.5) * patch
            for obj in scene.objects:
                cx, cy, radius = object_box(obj, 64)
                if abs(x - cx) <= radius + patch / 2 and abs(y - cy) <= radius + patch / 2:
                    object_code(vector, obj)
    return tokens


class Toy(nn.Module):
    def __init__(self, args: argparse.Namespace, in_dim: int, vocab: int = 512) -> None:
        super().__init__()
        w = args.width
        config = LlamaConfig(vocab_size=vocab, hidden_size=w, intermediate_size=2 * w, num_hidden_layers=args.layers,
                             num_attention_heads=w // 32, num_key_value_heads=max(1, w // 64), head_dim=32,
                             max_position_embeddings=1024)  # fmt: skip
        self.llm, self.head = LlamaModel(config), nn.Linear(w, vocab, bias=False)
        if args.init:
            saved = LlamaForCausalLM.from_pretrained(args.init)
            self.llm, self.head = saved.model, saved.lm_head
        if args.head_std:
            nn.init.normal_(self.head.weight, std=args.head_std)
        self.projector = nn.Sequential(nn.Linear(in_dim, w), nn.GELU(), nn.Linear(w, w))

    def forward(self, samples: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        """samples: (family, image tokens, [(text ids, is_answer), ...]) -> logits (B, L, V), labels (B, L)."""
        embed, rows = self.llm.embed_tokens, []
        for _, image, pieces in samples:
            parts, labels = [], []
            for ids, is_answer in pieces:
                if ids == "IMAGE":
                    parts.append(self.projector(image))
                    labels += [IGNORE_INDEX] * image.shape[0]
                    continue
                parts.append(embed(torch.tensor(ids)))
                labels += ids if is_answer else [IGNORE_INDEX] * len(ids)
            rows.append((torch.cat(parts), labels[1:] + [IGNORE_INDEX]))  # position t predicts token t+1
        length = max(x.shape[0] for x, _ in rows)
        x = torch.zeros(len(rows), length, self.head.in_features)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        y = torch.full((len(rows), length), IGNORE_INDEX)
        for i, (seq, labels) in enumerate(rows):  # left padding
            x[i, length - len(labels) :], mask[i, length - len(labels) :] = seq, 1
            y[i, length - len(labels) :] = torch.tensor(labels)
        return self.head(self.llm(inputs_embeds=x, attention_mask=mask).last_hidden_state), y


def sample(rng: random.Random, args, words: Words, pool: list[Scene] | None, turns: int) -> tuple:
    """One record: the image first, then ``turns`` question/answer pairs (every answer supervised, as in LLaVA)."""
    scene = rng.choice(pool) if pool else sample_scene(rng, "toy")
    asked = [q for q in questions(scene, rng) if q[0] != "text"]
    asked = rng.sample(asked, min(turns, len(asked)))
    pieces = [(words(SYSTEM), False)] if args.prompt == "llava" else []
    pieces.append(("IMAGE", False))
    for k, (_, question, answer) in enumerate(asked):
        text = ("USER: " if k else "") + question + (" " + SUFFIX if args.prompt == "llava" else "")
        pieces += [(words(text), False), (words(answer) + words("</s>"), True)]
    return asked[-1][0], oracle_tokens(scene, args.tokens), pieces


def evaluate(model: Toy, held_out: list[tuple]) -> dict[str, float]:
    """Teacher-forced exact match of the whole answer, per family."""
    hits: dict[str, list[bool]] = defaultdict(list)
    with torch.no_grad():
        for i in range(0, len(held_out), 200):
            batch = held_out[i : i + 200]
            logits, y = model(batch)
            ok = ((logits.argmax(-1) == y) | (y == IGNORE_INDEX)).all(-1)
            for (family, _, _), good in zip(batch, ok.tolist()):
                hits[family].append(good)
    result = {f: round(100 * sum(v) / len(v), 1) for f, v in sorted(hits.items())}
    result["all"] = round(100 * sum(sum(v) for v in hits.values()) / len(held_out), 1)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=0, help="0: one token per scene cell; N: N x N patches")
    p.add_argument("--prompt", choices=["short", "llava"], default="short", help="llava: system prompt + suffix")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--scenes", type=int, default=0, help="a fixed pool of training scenes (0: a new scene per sample)")
    p.add_argument("--turns", type=int, default=1, help="questions per training record (held-out: one)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--held-out", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="start the LLM and output layer from a saved LlamaForCausalLM")
    p.add_argument("--head-std", type=float, default=0.0, help="draw the output layer from N(0, std) (0: default)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    words = Words()
    held_rng = random.Random(12345)  # held-out scenes are new scenes, the same for every run
    held_out = [sample(held_rng, args, words, None, 1) for _ in range(args.held_out)]
    pool_rng = random.Random(99)
    pool = [sample_scene(pool_rng, "toy") for _ in range(args.scenes)] if args.scenes else None
    in_dim = ATTRS + (2 * args.tokens if args.tokens else 0)
    model = Toy(args, in_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng, losses, start = random.Random(args.seed), [], time.perf_counter()
    print(vars(args), flush=True)
    for step in range(1, args.steps + 1):
        logits, y = model([sample(rng, args, words, pool, args.turns) for _ in range(args.batch)])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            recent = losses[-50:]
            print(step, f"loss {sum(recent) / len(recent):.3f}", evaluate(model, held_out),
                  f"{time.perf_counter() - start:.0f}s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
