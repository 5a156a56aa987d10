"""Data: conversation templates, LLaVA JSON normalisation, and the one tokenization + label-masking routine.

``conversation`` renders turns into training strings and inference prompts (``TEMPLATES``); ``tokenization`` turns
the same rendering into ``input_ids`` / ``labels`` with image spans expanded and truncation that never cuts them.
"""

from .conversation import GPT, HUMAN, IMAGE_TOKEN, TEMPLATES, Span, Template, Turn, get_template, normalize_record
from .tokenization import (
    IGNORE_INDEX,
    ImageTokens,
    ImageTokenSpec,
    SkippedSample,
    TokenizationMismatchError,
    TokenizedConversation,
    check_against_prompt,
    tokenize_conversation,
    tokenize_prompt,
)

__all__ = [
    "GPT",
    "HUMAN",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "TEMPLATES",
    "ImageTokenSpec",
    "ImageTokens",
    "SkippedSample",
    "Span",
    "Template",
    "TokenizationMismatchError",
    "TokenizedConversation",
    "Turn",
    "check_against_prompt",
    "get_template",
    "normalize_record",
    "tokenize_conversation",
    "tokenize_prompt",
]
