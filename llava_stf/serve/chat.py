"""A multi-turn chat on top of the one generation helper (``llava_stf.generation.Generator``).

``ChatSession`` keeps the conversation as plain text turns and lets the checkpoint's saved template render it at each
question, so the history holds exactly what was said: the user's words (special-token strings such as ``</s>`` or
``<image>`` typed by the user are removed, since the tokenizer would read them as control tokens) and the answers as
the generator returns them (cut at EOS and decoded without special tokens; LLaVA's CLI stored ``"...</s>"`` and
rendered ``</s></s>``). The image is attached to the first turn (``"<image>\\n" + question``, as LLaVA-1.5). A question
whose prompt plus ``max_new_tokens`` would not fit the LLM's context is refused before generating, and the history
is left as it was. A checkpoint saved with the ``plain`` template (stage 1: image -> caption) has no turns to
continue: every question gets a fresh caption of the image.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from ..data.conversation import GPT, HUMAN, IMAGE_TOKEN, PlainTemplate, Turn
from ..generation import GenerationSettings, Generator, Request


class ChatError(ValueError):
    """A question that cannot be asked (too long for the context, or a checkpoint that cannot chat this way)."""


def context_length(model) -> int | None:
    """The LLM's maximum number of positions (``text_config.max_position_embeddings``), if the config says."""
    config = getattr(model.config, "text_config", model.config)
    return getattr(config, "max_position_embeddings", None)


class ChatSession:
    """One conversation with a checkpoint; ``ask`` answers a question and adds both to the history.

    Args:
        generator: The loaded checkpoint (its template, image mode and EOS come from the saved processor/config).
        image: The image the first question is about, or ``None`` for a text-only chat.
        settings: Token limit and sampling for every answer.
    """

    def __init__(
        self, generator: Generator, image: Image.Image | None = None, settings: GenerationSettings | None = None
    ):
        self.generator, self.image = generator, image
        self.settings = settings or GenerationSettings()
        self.turns: list[Turn] = []  # the history: alternating human / gpt, plain text
        self.last_prompt = ""  # the prompt string of the latest question (``--debug`` prints it)
        self.single_turn = isinstance(generator.template, PlainTemplate)
        if self.single_turn and image is None:
            raise ChatError(
                f"this checkpoint's conversation template is {generator.template.name!r} (stage 1: it only captions "
                "an image), so it needs an image"
            )
        self.context_length = context_length(generator.model)
        tokenizer = generator.tokenizer
        self.special_tokens = sorted({*tokenizer.all_special_tokens, IMAGE_TOKEN}, key=lambda t: (-len(t), t))

    def clean(self, text: str) -> tuple[str, list[str]]:
        """``text`` without special-token strings, stripped; and the strings that were removed."""
        removed = [token for token in self.special_tokens if token in text]
        for token in removed:
            text = text.replace(token, "")
        return text.strip(), removed

    def request(self, question: str) -> Request:
        """The request for ``question`` after the history (the image tag goes in front of the first question)."""
        if not self.turns and self.image is not None:
            question = f"{IMAGE_TOKEN}\n{question}"
        history = [] if self.single_turn else self.turns
        return Request((*history, Turn(HUMAN, question)), self.image)

    def ask(self, question: str, stream: Callable[[str], None] | None = None) -> str:
        """Answer ``question`` (already cleaned) and append the exchange to the history.

        Args:
            question: The user's message, without special-token strings (see ``clean``).
            stream: Optional ``callback(text)`` receiving the answer's text as it is generated.

        Returns:
            The answer, as stored in the history.

        Raises:
            ChatError: If the prompt plus ``max_new_tokens`` exceeds the LLM's context (nothing is generated).
        """
        request = self.request(question)
        self.last_prompt = self.generator.prompt(request)
        length = len(self.generator.processor.encode_prompt(self.last_prompt))  # image placeholders included
        if self.context_length is not None and length + self.settings.max_new_tokens > self.context_length:
            raise ChatError(
                f"the conversation would need {length} prompt tokens + up to {self.settings.max_new_tokens} new ones, "
                f"over the model's context of {self.context_length}: ask a shorter question, lower "
                "--max-new-tokens, or start a new chat"
            )
        callback = None if stream is None else (lambda _row, text: stream(text))
        answer = self.generator.generate([request], self.settings, stream=callback)[0]
        if not self.single_turn:
            self.turns = [*request.turns, Turn(GPT, answer)]
        return answer


__all__ = ["ChatError", "ChatSession", "context_length"]
