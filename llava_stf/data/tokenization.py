"""The one place that turns a conversation into ``input_ids`` and ``labels``, with LLaVA-1.5's layout and masking.

Upstream does this in haotian-liu/LLaVA ``llava/train/train.py`` (``preprocess_v1``, ``preprocess_plain``) and
``llava/mm_utils.py`` (``tokenizer_image_token``). Ids are built span by span from ``Template.spans`` and labels
alongside them, so the two cannot disagree: a span's ids are copied into ``labels`` when it is supervised (assistant
answers and their end-of-turn token) and replaced by ``IGNORE_INDEX`` otherwise (BOS, system, user turns, role
prefixes, image positions). Each ``<image>`` becomes ``num_image_tokens`` copies of the image token id: the count
of that sample's image (fixed for LLaVA-1.5; for AnyRes it depends on the image's size, so the dataset passes one
``ImageTokens`` per sample, from ``processor.image_token_counts``).

How pieces are tokenized. The target is upstream's id sequence: split the rendered prompt on ``<image>``, tokenize
every chunk on its own (BOS on the first only) and join the chunks with the image ids (``tokenize_prompt``). A span's
text is cut at its ``<image>`` tags into pieces, each encoded with ``add_special_tokens=False`` in the context it has
inside its chunk, and only the piece's own ids are kept:

- at a chunk start (the sequence start, or right after an image): no context. The piece is a fresh text, so a
  SentencePiece tokenizer adds its word-initial marker ``"▁"``, exactly as upstream does for the text after an image
  (``"\\nWhat"`` starts with ``["▁", "<0x0A>", ...]``); a byte-level BPE adds nothing;
- right after the end-of-turn token: context ``"</s>"``, so the tokenizer applies its own rule for text after a
  special token (no marker for Llama ``legacy=False``, a marker for ``legacy=True``), as in the whole chunk;
- after running text: context ``"a"``. Templates cut running text only right before a space, which starts a new word
  for both SentencePiece (``"▁"``) and byte-level pre-tokenizers, so nothing merges across the cut.

So the concatenation equals the whole-chunk tokenization for byte-level BPE and for SentencePiece-style Llama
tokenizers (Metaspace ``first`` / ``always``, or the old ``Prepend`` normalizer). The known exception is a run of
several spaces at a cut (``"why  ASSISTANT:"``), which SentencePiece may segment differently; the text is the same.
``check_against_prompt`` (``verify=True``) raises when the ids do not spell the rendered prompt.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from transformers import PreTrainedTokenizerBase

from .conversation import IMAGE_TOKEN, Span, Template, Turn

IGNORE_INDEX = -100
NO_SUPERVISION = "no_supervision"  # SkippedSample.reason: nothing left to train on
SPECIAL_TOKEN_IN_TEXT = "special_token_in_text"  # SkippedSample.reason: a message spells BOS / EOS / <image>
_TEXT_CONTEXT = "a"  # one-token word encoded before a running-text piece, then dropped
MEMO_ENTRIES = 8192  # texts remembered per tokenizer by ``encode``; 0: none (``llava_stf.bench.tokenize``)
_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(text, vocab size): ids}


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """``tokenizer.encode(text, add_special_tokens=False)``, remembered per tokenizer: every sample repeats the system
    prompt, role tags and instruction suffixes, whose encoding was most of a sample's tokenization time. The key holds
    the vocabulary size (added tokens change encodings); a full memo is emptied and refilled."""
    try:
        memo = _MEMO.setdefault(tokenizer, {}) if MEMO_ENTRIES > 0 else None
    except TypeError:  # a tokenizer class that is not hashable or not weak-referenceable: no memo
        memo = None
    if memo is None:
        return tokenizer.encode(text, add_special_tokens=False)
    key = (text, len(tokenizer))
    ids = memo.get(key)
    if ids is None:
        if len(memo) >= MEMO_ENTRIES:
            memo.clear()
        ids = memo[key] = tuple(tokenizer.encode(text, add_special_tokens=False))
    return list(ids)


class ImageTokenSpec(Protocol):
    """What tokenization needs to know about images; ``LlavaStfProcessor`` satisfies it."""

    image_token_id: int
    num_image_tokens: int


@dataclass(frozen=True)
class ImageTokens:
    """A plain ``ImageTokenSpec``."""

    image_token_id: int  # vocabulary id of "<image>"
    num_image_tokens: int  # placeholders per image (576 for LLaVA-1.5, 144 for MBTF+STF; AnyRes: by image size)


@dataclass(frozen=True)
class TokenizedConversation:
    """One training sample; ``input_ids`` and ``labels`` are ``[T]`` with ``T <= max_length``."""

    input_ids: list[int]  # [T], image spans expanded
    labels: list[int]  # [T], IGNORE_INDEX where not supervised
    num_truncated_tokens: int = 0  # tokens cut off the end to fit max_length

    @property
    def truncated(self) -> bool:
        return self.num_truncated_tokens > 0


class SkippedSample(Exception):
    """A sample that cannot be trained on; the dataset layer counts these by ``reason``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class TokenizationMismatchError(RuntimeError):
    """The piecewise ids do not spell the rendered prompt (a tokenizer/template incompatibility)."""


def leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts before a text (``[BOS]`` for Llama, ``[]`` for Qwen-style tokenizers)."""
    plain = encode(tokenizer, _TEXT_CONTEXT)
    full = tokenizer.encode(_TEXT_CONTEXT, add_special_tokens=True)  # BOS settings can change: not remembered
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    raise ValueError(f"cannot find the text ids {plain} inside the ids with special tokens {full}")


def tokenize_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase, image: ImageTokenSpec | None = None) -> list[int]:
    """LLaVA's ``tokenizer_image_token``: chunks split on ``<image>``, each tokenized alone, image ids between.

    Args:
        prompt: a rendered string (``Template.render`` or ``Template.prompt``).
        tokenizer: the LLM tokenizer.
        image: image token id and count; required when ``prompt`` holds ``<image>``.

    Returns:
        ``input_ids`` ``[T]``: leading special ids, then chunk ids with ``num_image_tokens`` image ids per tag.
    """
    chunks = prompt.split(IMAGE_TOKEN)
    if len(chunks) > 1 and image is None:
        raise ValueError(f"the prompt holds {IMAGE_TOKEN!r} but no image token spec was given")
    ids = leading_special_ids(tokenizer) + tokenizer.encode(chunks[0], add_special_tokens=False)
    for chunk in chunks[1:]:
        ids += [image.image_token_id] * image.num_image_tokens + tokenizer.encode(chunk, add_special_tokens=False)
    return ids


class _PieceEncoder:
    """Encodes spans in order, tracking what precedes each piece (chunk start, special token, running text)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image: ImageTokenSpec | None):
        self.tokenizer, self.image = tokenizer, image
        self.context: tuple[str, list[int]] | None = None  # None at a chunk start, else (text, its ids) before it
        self.text_context = (_TEXT_CONTEXT, encode(tokenizer, _TEXT_CONTEXT))
        forbidden = [tokenizer.bos_token_id, tokenizer.eos_token_id, image.image_token_id if image else None]
        self.forbidden = {i for i in forbidden if i is not None}

    def encode(self, span: Span) -> list[int]:
        if span.special:
            token_id = self.tokenizer.convert_tokens_to_ids(span.text)
            if token_id is None or token_id == self.tokenizer.unk_token_id:
                raise ValueError(f"the template token {span.text!r} is not in the tokenizer's vocabulary")
            self.context = (span.text, [token_id])
            return [token_id]
        ids: list[int] = []
        for k, piece in enumerate(span.text.split(IMAGE_TOKEN)):
            if k > 0:
                if self.image is None:
                    raise ValueError(f"the text holds {IMAGE_TOKEN!r} but no image token spec was given")
                ids += [self.image.image_token_id] * self.image.num_image_tokens
                self.context = None
            if piece:
                ids += self._text(piece)
                self.context = self.text_context
        return ids

    def _text(self, piece: str) -> list[int]:
        if self.context is None:
            ids = encode(self.tokenizer, piece)
        else:
            context, prefix = self.context
            ids = encode(self.tokenizer, context + piece)
            if ids[: len(prefix)] != prefix:
                raise ValueError(f"{piece!r} merges with its context {context!r}; templates must cut before a space")
            ids = ids[len(prefix) :]
        if self.forbidden.intersection(ids):
            found = sorted(self.forbidden.intersection(ids))
            raise SkippedSample(SPECIAL_TOKEN_IN_TEXT, f"{piece[:80]!r} tokenizes to special ids {found}")
        return ids


def tokenize_conversation(
    turns: Sequence[Turn],
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    image: ImageTokenSpec | None = None,
    max_length: int | None = None,
    verify: bool = False,
) -> TokenizedConversation:
    """Build ``input_ids`` and ``labels`` for one conversation, truncated to ``max_length``.

    Truncation counts expanded image tokens and never cuts an image span. It keeps the longest run of whole
    rounds (user turn + answer with its end-of-turn token) that fits; when not even the first round fits, it cuts the
    first answer's tail (trained without its end-of-turn token).

    Args:
        turns: alternating human/gpt turns (``normalize_record``); ``<image>`` tags are expanded via ``image``.
        template: how to render them (``get_template``).
        tokenizer: the LLM tokenizer (byte-level BPE or SentencePiece-style; see the module docstring).
        image: image token id and count; required when a turn holds ``<image>``.
        max_length: the longest sequence to return (``model_max_length``); ``None`` for no limit.
        verify: also check that the ids spell ``template.render(turns)`` (``check_against_prompt``).

    Returns:
        ``TokenizedConversation`` with ``input_ids`` ``[T]`` and ``labels`` ``[T]``.

    Raises:
        SkippedSample: no supervised token fits in ``max_length`` (``NO_SUPERVISION``), or a message spells a
            special token (``SPECIAL_TOKEN_IN_TEXT``).
        TokenizationMismatchError: with ``verify``, when the ids do not spell the rendered prompt.
    """
    encoder = _PieceEncoder(tokenizer, image)
    image_id = image.image_token_id if image is not None else None
    ids = leading_special_ids(tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    turn_ends: dict[int, int] = {}  # turn index -> sequence length after its last span
    for span in template.spans(turns):
        span_ids = encoder.encode(span)
        ids += span_ids
        labels += [t if span.supervised and t != image_id else IGNORE_INDEX for t in span_ids]
        turn_ends[span.turn] = len(ids)
    if verify:
        check_against_prompt(ids, template.render(turns), tokenizer, image)
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not supervised:
        raise SkippedSample(NO_SUPERVISION, f"no assistant tokens among {len(ids)} tokens")
    if max_length is None or len(ids) <= max_length:
        return TokenizedConversation(ids, labels)
    round_ends = [end for turn, end in turn_ends.items() if turn % 2 == 1 and end <= max_length]  # after answers
    cut = max(round_ends, default=max_length)
    while image_id is not None and 0 < cut < len(ids) and ids[cut - 1] == image_id == ids[cut]:
        cut -= 1  # never split an image span: cut before it
    if supervised[0] >= cut:
        raise SkippedSample(
            NO_SUPERVISION,
            f"{len(ids)} tokens > max_length {max_length} and the first supervised token is at {supervised[0]}",
        )
    return TokenizedConversation(ids[:cut], labels[:cut], num_truncated_tokens=len(ids) - cut)


def check_against_prompt(
    input_ids: Sequence[int], rendered: str, tokenizer: PreTrainedTokenizerBase, image: ImageTokenSpec | None = None
) -> None:
    """Raise ``TokenizationMismatchError`` unless ``input_ids`` spell ``rendered`` as ``tokenize_prompt`` does.

    Equal ids pass. Otherwise both are decoded the same way (special tokens kept) and must give the same text: a
    different segmentation of the same text passes, a missing, extra or changed character fails.

    Args:
        input_ids: ``[T]`` ids from ``tokenize_conversation`` (before truncation).
        rendered: the rendered string (``Template.render``).
        tokenizer: the tokenizer both were made with.
        image: image token id and count, as given to ``tokenize_conversation``.
    """
    expected = tokenize_prompt(rendered, tokenizer, image)
    if list(input_ids) == expected:
        return
    got_text, expected_text = tokenizer.decode(list(input_ids)), tokenizer.decode(expected)
    if got_text != expected_text:
        shorter = min(len(got_text), len(expected_text))
        at = next((i for i, (a, b) in enumerate(zip(got_text, expected_text)) if a != b), shorter)
        window = slice(max(0, at - 40), at + 40)
        raise TokenizationMismatchError(
            f"the piecewise ids spell another text than the rendered prompt (first difference at character {at}): "
            f"pieces {got_text[window]!r} vs prompt {expected_text[window]!r}"
        )


__all__ = [
    "IGNORE_INDEX",
    "NO_SUPERVISION",
    "SPECIAL_TOKEN_IN_TEXT",
    "ImageTokenSpec",
    "ImageTokens",
    "SkippedSample",
    "TokenizationMismatchError",
    "TokenizedConversation",
    "check_against_prompt",
    "leading_special_ids",
    "tokenize_conversation",
    "tokenize_prompt",
]
