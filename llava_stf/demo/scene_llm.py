"""The demo's pre-built Vicuna: a tiny Llama pre-trained on the cell-word language (``scene_text``), built once.

``build_scene_llm`` samples scenes from the world's generator (its own split, never the evaluation's images), trains a
BPE tokenizer on their captions and questions, adds the cell words as single tokens, and trains a from-scratch
Llama on the caption and question documents at every image-token grid of ``SceneLLMSettings.sides``. A cell word's
input embedding is kept equal to the scaled sum of its parts' (``large`` + ``red`` + ``circle``; ``compose``): a
lookup by colour or by shape then uses a key the question's own word is part of. It records the LLM's accuracy per
question family on held-out scenes given their true cells (what the LLM can do with perfect vision) in
``build.json``.

``python -m llava_stf.demo build-llm [--out DIR]`` rebuilds it (about 75 min on two CPU cores at the defaults). The
build the demo uses ships with the package (``PREBUILT``, with ``build.json``: its settings, accuracy and the digest of
every file), so the 5-minute demo runs only stage 1, stage 2, evaluation and chat, as LLaVA starts from a
pre-trained LLM. Rebuilding gives the same weights on the same torch build and thread count (seeded); elsewhere the
last bits differ and so may the accuracy, since which lookups a build learns is sensitive to them
(docs/demo-compare/miniature-limits.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM

from ..data.conversation import IMAGE_TOKEN, get_template
from ..data.synthetic import GRID, sample_scene, scene_rng
from ..errors import UserError
from ..testing import _CORPUS, tiny_text_config, tiny_tokenizer
from .llm import pad_batch, train_lm
from .scene_text import cell_words, encode_document, scene_conversations, scene_grid, word_parts

logger = logging.getLogger(__name__)
PREBUILT = Path(__file__).parent / "prebuilt" / "scene-llm"
BUILD_FILE = "build.json"
BUILD_THREADS = 2  # torch threads of ``build-llm`` (the shipped build's)


@dataclass(frozen=True)
class SceneLLMSettings:
    """Everything that decides the pre-built LLM (``build.json`` records it)."""

    hidden: int = 128  # width
    layers: int = 3  # 2 layers learned colour-by-shape lookups to ~55 %, 3 to ~70 % in the same steps
    # 8 attention heads of 16 (4 key/value heads): with 4 of 32 the builds learnt one of the two hard lookups (colour
    # by shape, a cell's place), not both (docs/demo-compare/miniature-limits.md)
    heads: int = 8
    kv_heads: int = 4
    vocab_size: int = 1024  # BPE trained on the generator's text, plus the cell words
    # image-token grids it reads: 3 = the 9 tokens of the 4x-compressing projectors at 96 px. Also reading the 36 of
    # the others (sides 3 and 6) cost it the shape-keyed lookup: colour 90 against 98 % given the
    # true cells, 60 against 85 % in the demo (docs/demo-compare/miniature-limits.md)
    sides: tuple[int, ...] = (3,)
    scenes: int = 6000  # generated scene descriptions (text only; split "llm", disjoint from the images' splits)
    eval_scenes: int = 100  # held-out scene descriptions for the accuracy in build.json
    # 6,000 steps of 128 documents: at 64 per step the shared part below taught colour or position depending on the
    # seed; at 128 both (about 75 min on two cores; docs/demo-compare/miniature-limits.md)
    steps: int = 6000
    batch_size: int = 128
    lr: float = 2e-3
    head_std: float = 0.05  # output layer init std (see ``pipeline.DemoSettings.llm_head_std``)
    max_position_embeddings: int = 1024
    # "always": every cell word's embedding is kept equal to the scaled sum of its parts' (reset after each step), so
    # "circle" in a question is literally part of <cell_large_red_circle>; "init": only at the start, then learnt
    # freely (then the LLM learnt colour-keyed lookups but not shape-keyed ones: colour 57 %, position 41 %)
    compose: str = "always"
    # a word every cell word also holds, as one more part ("" for none): with "image" the cells share a direction and
    # the LLM can tell each cell its place (position given the true cells 44 -> 78 % at the earlier 2,400 x 64 steps)
    shared_part: str = "image"
    seed: int = 0


def documents(settings: SceneLLMSettings, split: str, count: int, tokenizer) -> list[tuple[list[int], list[int], str]]:
    """``(input_ids, labels, family)`` of every caption and question of ``count`` scenes of ``split``, each scene
    written at one of ``settings.sides`` (drawn per scene)."""
    out = []
    for i in range(count):
        rng = scene_rng(settings.seed, split, i)
        scene = sample_scene(rng, "")
        words = scene_grid(scene, rng.choice(settings.sides))
        for template, family, turns in scene_conversations(scene, rng):
            ids, labels = encode_document(turns, template, words, tokenizer)
            out.append((ids, labels, family))
    return out


def generator_text(settings: SceneLLMSettings, count: int = 2000) -> list[str]:
    """The rendered conversations (templates included) of ``count`` scenes: the BPE tokenizer's corpus."""
    texts = []
    for i in range(count):
        rng = scene_rng(settings.seed, "llm", i)
        for template, _, turns in scene_conversations(sample_scene(rng, ""), rng):
            texts.append(get_template(template).render(turns).replace(IMAGE_TOKEN, ""))
    return texts


@torch.no_grad()
def accuracy(model: LlamaForCausalLM, docs: list[tuple[list[int], list[int], str]], pad_id: int) -> dict[str, float]:
    """Percent of documents whose every trained token (answer and end of turn) is the model's top choice given the
    true prefix, i.e. whose greedy answer is exact; per family and ``overall``."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for k in range(0, len(docs), 64):
        batch = docs[k : k + 64]
        ids, _, mask = pad_batch([(d[0], d[1]) for d in batch], pad_id)
        top = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)  # (batch, width)
        for b, (_, labels, family) in enumerate(batch):
            positions = [t for t in range(1, len(labels)) if labels[t] != -100]
            hits[family].append(all(top[b, t - 1].item() == labels[t] for t in positions))
    result = {f: round(100 * sum(v) / len(v), 1) for f, v in sorted(hits.items())}
    everything = [h for f, v in hits.items() if f != "caption" for h in v]
    return {**result, "overall": round(100 * sum(everything) / max(len(everything), 1), 1)}


def build_scene_llm(out: Path, settings: SceneLLMSettings = SceneLLMSettings(), progress: bool = False) -> Path:
    """Build the LLM and its tokenizer into ``out`` (an ordinary Llama checkpoint + ``build.json``); returns ``out``."""
    start = time.perf_counter()
    tokenizer = tiny_tokenizer(settings.vocab_size, corpus=_CORPUS + generator_text(settings),
                               with_image_token=False, with_pad_token=False)  # fmt: skip
    words = cell_words()
    tokenizer.add_tokens(words, special_tokens=True)
    train = documents(settings, "llm", settings.scenes, tokenizer)
    held_out = documents(settings, "llm-eval", settings.eval_scenes, tokenizer)
    torch.manual_seed(settings.seed)
    config = tiny_text_config(len(tokenizer), hidden_size=settings.hidden, intermediate_size=2 * settings.hidden,
                              num_hidden_layers=settings.layers, num_attention_heads=settings.heads,
                              num_key_value_heads=settings.kv_heads, pad_token_id=None,
                              max_position_embeddings=settings.max_position_embeddings)  # fmt: skip
    model = LlamaForCausalLM(config)
    torch.nn.init.normal_(model.lm_head.weight, std=settings.head_std)
    embeddings = model.get_input_embeddings().weight
    rows = torch.tensor(tokenizer.convert_tokens_to_ids(words))
    shared = [settings.shared_part] if settings.shared_part else []
    parts = [[i for p in shared + word_parts(w) for i in tokenizer(" " + p, add_special_tokens=False)["input_ids"]]
             for w in words]  # fmt: skip
    width = max(map(len, parts))
    index = torch.tensor([p + [0] * (width - len(p)) for p in parts])  # (words, width): the parts' token ids
    weight = torch.tensor([[len(p) ** -0.5] * len(p) + [0.0] * (width - len(p)) for p in parts])  # 0: padding

    @torch.no_grad()
    def compose() -> None:  # each cell word = the scaled sum of its parts, as they are now (settings.compose)
        embeddings[rows] = (embeddings[index] * weight[..., None]).sum(1)

    compose()
    eos = tokenizer.eos_token_id
    loss = train_lm(model, [(ids, labels) for ids, labels, _ in train], settings.steps, settings.lr, eos,
                    settings.batch_size, settings.seed, progress, desc="scene llm",
                    after_step=compose if settings.compose == "always" else None)  # fmt: skip
    result = accuracy(model, held_out, eos)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"settings": asdict(settings), "final_loss": round(loss, 4), "held_out_accuracy": result,
              "documents": len(train), "seconds": round(time.perf_counter() - start),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "device": str(torch.empty(0).device)}  # fmt: skip
    record["digests"] = file_digests(out)
    (out / BUILD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    logger.info("scene llm: %s", result)
    return out


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file of a build but ``build.json``."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != BUILD_FILE}  # fmt: skip


def read_build(folder: Path) -> dict[str, Any] | None:
    """``build.json`` of ``folder`` when every file it lists has its digest; else None."""
    path = folder / BUILD_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("digests") == file_digests(folder) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_stf.demo build-llm", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PREBUILT, help=f"where to write it (default: {PREBUILT})")
    parser.add_argument("--steps", type=int, default=SceneLLMSettings.steps)
    parser.add_argument("--sides", type=int, nargs="+", default=list(SceneLLMSettings.sides),
                        help="image-token grids it reads (multiples of the world's 3; default 3: the 9 tokens of the "
                        "4x projectors at 96 px; 3 6 also the 36 of the others)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="where to train it (e.g. cuda: minutes instead of ~75 min on "
                        "2 cores; the files then differ from a CPU build's in the last bits)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    bad = [side for side in args.sides if side < 1 or side % GRID]
    if bad:
        raise UserError(f"--sides {' '.join(map(str, bad))}: each side must be a positive multiple of the world's "
                        f"{GRID} x {GRID} grid")  # fmt: skip
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file, not a folder")
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:  # an unknown name, or a device this torch or machine lacks
        raise UserError(f"--device {args.device}: {str(err).splitlines()[0]}") from None
    torch.set_num_threads(BUILD_THREADS)  # the shipped digests are for this count: other counts differ in the last bits
    settings = SceneLLMSettings(steps=args.steps, sides=tuple(dict.fromkeys(args.sides)))
    with device:  # every tensor of the build (model, batches, cell-word tables) is made there
        folder = build_scene_llm(args.out, settings, progress=not args.no_progress)
    record = json.loads((folder / BUILD_FILE).read_text())
    print(
        f"built {folder} in {record['seconds']} s: held-out accuracy given the true cells {record['held_out_accuracy']}"
    )
    return 0


__all__ = ["PREBUILT", "SceneLLMSettings", "accuracy", "build_scene_llm", "documents", "main", "read_build"]
