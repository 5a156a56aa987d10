"""The demo LLM's native language: a scene written as one word per cell of the image-token grid.

LLaVA starts from a Vicuna that already reads and reasons in language; stage 1 only teaches the projector to write
the image in words the LLM understands. A tiny Llama pre-trained on the world's captions cannot look anything up
(asked about a described scene it answers at ~27 %), so stage 2 had to teach it lookups from scratch and never got
there in the demo's budget. This gives the demo's Vicuna a language in which a scene is *already* laid out as its
image tokens will be: the cell words. An image of ``side x side`` tokens (``side`` a multiple of the world's 3 x 3
grid: 3 for the 9 tokens of the 4x-compressing projectors at 96 px, 6 for the 36 of ``mlp2x_gelu`` and ``mbtf``)
is written as ``side * side`` words in raster order, each naming what covers that cell: ``<cell_large_red_circle>``,
``<cell_text>`` (a written label), ``<cell_empty>``. The LLM is pre-trained, from text alone, to caption such
sequences and to answer the world's questions about them, in the very token layout of a multimodal sample (the cell
words sit where the image tokens will). Stage 1 then has to map each image token onto the word of its cell: a
per-token job a projector learns quickly, instead of a lookup skill.

The text of the label itself is not in the language (one word per cell cannot spell it): text questions are left
out of the pre-training and stay with stage 2 and the pixels.

Only the generated world has scene descriptions; a world of one's own (``--data``) pre-trains its LLM on its
captions and instructions (``llm.world_documents``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from transformers import PreTrainedTokenizerBase

from ..data.conversation import Turn, get_template
from ..data.synthetic import COLORS, GRID, SHAPES, SHORT_ANSWER, SIZES, Scene, answer_text, caption, questions
from ..data.synthetic import FAMILIES as WORLD_FAMILIES
from ..data.tokenization import ImageTokens, tokenize_conversation

EMPTY, TEXT = "<cell_empty>", "<cell_text>"
SLOT = -1  # the image positions while a document is tokenized, before the cell words replace them
FAMILIES = tuple(f for f in WORLD_FAMILIES if f != "text")  # answerable from the cell words (a label is not)


def object_word(size: str, color: str, shape: str) -> str:
    return f"<cell_{size}_{color}_{shape}>"


def cell_words() -> list[str]:
    """Every word of the language: empty, label, then one per (size, colour, shape)."""
    return [EMPTY, TEXT] + [object_word(s, c, h) for s in SIZES for c in COLORS for h in SHAPES]


def word_parts(word: str) -> list[str]:
    """The plain words a cell word is made of (``<cell_large_red_circle>`` -> ``["large", "red", "circle"]``)."""
    return word.removeprefix("<cell_").removesuffix(">").split("_")


def scene_grid(scene: Scene, side: int) -> list[str]:
    """The ``side * side`` cell words of ``scene`` in raster order (``side``: a multiple of the world's grid)."""
    if side % GRID:
        raise ValueError(f"side {side} is not a multiple of the world's {GRID} x {GRID} grid")
    k = side // GRID
    where = {(o.row, o.col): object_word(o.size, o.color, o.shape) for o in scene.objects}
    if scene.label:
        where.setdefault(tuple(scene.label_cell), TEXT)
    return [where.get((i // k, j // k), EMPTY) for i in range(side) for j in range(side)]


def scene_conversations(scene: Scene, rng: random.Random) -> Iterator[tuple[str, str, list[Turn]]]:
    """``(template, family, turns)``: the caption (stage 1's plain template) and each question the scene answers
    from its cells, one per conversation (``vicuna_v1``), worded as the generated world's records."""
    yield "plain", "caption", [Turn("human", "<image>\nDescribe the image briefly."), Turn("gpt", caption(scene))]
    for family, question, answer in questions(scene, rng):
        if family in FAMILIES:
            yield "vicuna_v1", family, [Turn("human", f"<image>\n{question}\n{SHORT_ANSWER}"),
                                        Turn("gpt", answer_text(answer))]  # fmt: skip


def encode_document(turns: Sequence[Turn], template: str, words: Sequence[str],
                    tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:  # fmt: skip
    """``(input_ids, labels)`` ([T] each) of a conversation whose image is written as ``words``: the multimodal
    sample's own layout and label mask (``data.tokenization``) with the cell words' ids in the image positions."""
    sample = tokenize_conversation(turns, get_template(template), tokenizer, ImageTokens(SLOT, len(words)))
    ids = iter(tokenizer.convert_tokens_to_ids(list(words)))
    return [next(ids) if t == SLOT else t for t in sample.input_ids], sample.labels


__all__ = [
    "EMPTY",
    "FAMILIES",
    "TEXT",
    "cell_words",
    "encode_document",
    "scene_conversations",
    "scene_grid",
    "word_parts",
]
