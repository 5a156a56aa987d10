"""Conversation templates (``vicuna_v1``, ``llava_v1``, ``plain``) and LLaVA JSON record normalisation.

A template turns a conversation (alternating ``human`` / ``gpt`` turns, starting with ``human``) into ``Span``s:
consecutive pieces of the rendered string, each marked supervised or not. ``render`` joins them into the training
string, ``prompt`` appends the open assistant slot for generation, and ``llava_stf.data.tokenization`` tokenizes the
very same spans. The string a model trains on, the prompt it is evaluated with and its label mask therefore come from
one description. Strings follow LLaVA-1.5 byte for byte (haotian-liu/LLaVA ``llava/conversation.py``). Templates are
frozen and looked up by name in the read-only ``TEMPLATES``; there is no global or default conversation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

IMAGE_TOKEN = "<image>"
HUMAN, GPT = "human", "gpt"
ROLES = (HUMAN, GPT)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class Turn:
    """One message of a conversation."""

    role: str  # "human" or "gpt" (the LLaVA JSON roles; templates map them to their own names)
    text: str  # the message; may contain IMAGE_TOKEN (normalised records: only at the front of the first turn)


@dataclass(frozen=True)
class Span:
    """A consecutive piece of the rendered string; the spans of a conversation concatenate to ``render``."""

    text: str  # the piece; may contain IMAGE_TOKEN, which tokenization expands
    supervised: bool  # True: trained on (labels = ids); False: masked with IGNORE_INDEX
    turn: int  # index of the turn this piece renders; truncation keeps or drops whole turns
    special: bool = False  # the text is one vocabulary token (the end-of-turn "</s>"), never tokenized as text


def check_turns(turns: Sequence[Turn]) -> None:
    """Raise ``ValueError`` unless ``turns`` is non-empty, starts with ``human`` and alternates roles."""
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    for i, turn in enumerate(turns):
        expected = ROLES[i % 2]
        if turn.role != expected:
            roles = [t.role for t in turns]
            raise ValueError(
                f"turns must alternate human/gpt starting with human; turn {i} is {turn.role!r} in {roles}"
            )


@dataclass(frozen=True)
class Template:
    """Base of the templates: ``spans`` is the one rendering rule; ``render`` and ``prompt`` join its pieces."""

    name: str

    def spans(self, turns: Sequence[Turn], add_generation_prompt: bool = False) -> list[Span]:
        """Pieces of the rendered conversation (``add_generation_prompt``: end with the open assistant slot)."""
        raise NotImplementedError

    def render(self, turns: Sequence[Turn]) -> str:
        """The training string of ``turns``."""
        return "".join(span.text for span in self.spans(turns))

    def prompt(self, turns: Sequence[Turn]) -> str:
        """The inference prompt: ``turns`` (ending with a human turn) followed by the open assistant slot."""
        return "".join(span.text for span in self.spans(turns, add_generation_prompt=True))


@dataclass(frozen=True)
class SeparatorTemplate(Template):
    """``system USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>`` (upstream ``SeparatorStyle.TWO``).

    The system prompt is glued to the first user turn, and every boundary inside running text falls right before a
    space (``" ASSISTANT:"``, ``" " + answer``), which keeps piecewise tokenization equal to whole-string
    tokenization. Supervised: ``" " + answer`` (the space after the colon is merged into the first answer token, as
    upstream) and the end-of-turn token ``sep2``.
    """

    system: str = VICUNA_SYSTEM
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "  # after the system prompt and after each user turn
    sep2: str = "</s>"  # ends each assistant turn; the tokenizer's EOS token, emitted as one id

    def spans(self, turns: Sequence[Turn], add_generation_prompt: bool = False) -> list[Span]:
        check_turns(turns)
        if add_generation_prompt and turns[-1].role != HUMAN:
            raise ValueError("an inference prompt must end with a human turn")
        user, assistant = self.roles
        out: list[Span] = []
        for i, turn in enumerate(turns):
            if turn.role == HUMAN:
                head = self.system + self.sep if i == 0 else ""
                out.append(Span(f"{head}{user}: {turn.text}", False, i))
            else:
                out.append(Span(f"{self.sep}{assistant}:", False, i))
                out.append(Span(f" {turn.text}", True, i))
                out.append(Span(self.sep2, True, i, special=True))
        last = len(turns) - 1
        if add_generation_prompt:
            out.append(Span(f"{self.sep}{assistant}:", False, last + 1))  # no trailing space
        elif turns[last].role == HUMAN:
            out.append(Span(self.sep, False, last))  # upstream renders a trailing user turn as "USER: q "
        return out


@dataclass(frozen=True)
class PlainTemplate(Template):
    """Stage 1: ``"<image>" + caption + "\\n"``. The human text is discarded; no system, roles or EOS."""

    sep: str = "\n"  # ends the caption; supervised

    def spans(self, turns: Sequence[Turn], add_generation_prompt: bool = False) -> list[Span]:
        check_turns(turns)
        expected = 1 if add_generation_prompt else 2
        if len(turns) != expected:
            raise ValueError(f"the plain template takes exactly {expected} turn(s), got {len(turns)}")
        if IMAGE_TOKEN not in turns[0].text:
            raise ValueError(f"the plain template needs {IMAGE_TOKEN!r} in the human turn: {turns[0].text!r}")
        out = [Span(IMAGE_TOKEN, False, 0)]
        if not add_generation_prompt:
            out.append(Span(turns[1].text + self.sep, True, 1))
        return out


TEMPLATES: Mapping[str, Template] = MappingProxyType(
    {
        "vicuna_v1": SeparatorTemplate("vicuna_v1", system=VICUNA_SYSTEM),  # LLaVA-1.5 training and evaluation
        "llava_v1": SeparatorTemplate("llava_v1", system=LLAVA_SYSTEM),  # look-alike; not what v1.5 trained on
        "plain": PlainTemplate("plain"),  # stage 1 (projector pretraining)
    }
)


def get_template(name: str) -> Template:
    """Look up a template by name; an unknown name lists the valid ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown conversation template {name!r}; valid templates: {sorted(TEMPLATES)}") from None


def place_image_first(text: str) -> str:
    """Upstream rule for a turn holding ``<image>``: drop every tag, strip, return ``"<image>\\n" + text``, stripped."""
    return (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()


def normalize_record(record: Mapping[str, Any]) -> tuple[Turn, ...]:
    """Turns of one LLaVA JSON sample, normalised as LLaVA's loader does (haotian-liu/LLaVA ``llava/train/train.py``).

    Roles must be ``human`` / ``gpt``; a leading non-human turn is dropped; the rest must alternate. Every turn that
    holds ``<image>`` gets it moved to its front (``place_image_first``); other turns are left byte for byte. An image
    sample (``record["image"]`` set) must then hold exactly one ``<image>``, in the first turn; a text-only sample
    must hold none (the tag is a vocabulary token here, so a stray one would be read as an image).

    Args:
        record: ``{"id": ..., "image": optional path, "conversations": [{"from": role, "value": text}, ...]}``.

    Returns:
        The turns, starting with ``human``.

    Raises:
        ValueError: malformed record (unknown role, no turns, broken alternation, misplaced or missing tag).
    """
    turns = []
    for message in record["conversations"]:
        if message["from"] not in ROLES:
            raise ValueError(f"unknown role {message['from']!r} in record {record.get('id')!r}; valid roles: {ROLES}")
        turns.append(Turn(message["from"], message["value"]))
    if turns and turns[0].role != HUMAN:
        turns = turns[1:]
    try:
        check_turns(turns)
    except ValueError as err:
        raise ValueError(f"record {record.get('id')!r}: {err}") from None
    turns = [Turn(t.role, place_image_first(t.text)) if IMAGE_TOKEN in t.text else t for t in turns]
    tagged = [i for i, t in enumerate(turns) if IMAGE_TOKEN in t.text]
    if record.get("image") is not None and tagged != [0]:
        raise ValueError(
            f"record {record.get('id')!r} has an image, so exactly its first turn must hold {IMAGE_TOKEN!r}; "
            f"turns holding it: {tagged}"
        )
    if record.get("image") is None and tagged:
        raise ValueError(f"record {record.get('id')!r} has no image but turns {tagged} hold {IMAGE_TOKEN!r}")
    return tuple(turns)


__all__ = [
    "GPT",
    "HUMAN",
    "IMAGE_TOKEN",
    "LLAVA_SYSTEM",
    "TEMPLATES",
    "VICUNA_SYSTEM",
    "PlainTemplate",
    "SeparatorTemplate",
    "Span",
    "Template",
    "Turn",
    "check_turns",
    "get_template",
    "normalize_record",
    "place_image_first",
]
