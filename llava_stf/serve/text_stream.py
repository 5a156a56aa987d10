"""A streamed answer's text: what may be shown while it grows, and its final content.

The content is the answer with leading and trailing whitespace stripped (as the ``Generator``'s answers are), cut
before the first stop string (OpenAI's ``stop``). While the answer grows, ``feed`` shows only text that stays: the
trailing whitespace (a strip could remove it) and a suffix that could still become a stop string are held back.
"""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    """One row's answer as it arrives: what is safe to show (nothing a later stop string or strip would take back).

    The content is the answer with leading and trailing whitespace stripped, cut before the first stop string.
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops, self.text, self.shown, self.stopped = tuple(stops), "", 0, False

    def feed(self, piece: str) -> str:
        """Add generated text; return the newly shown text."""
        if self.stopped:
            return ""
        self.text += piece
        if not self.shown:
            self.text = self.text.lstrip()
        cut = self._first_stop(self.text)
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._show(len(self.text.rstrip()))
        held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._show(len(self.text[: len(self.text) - held].rstrip()))

    def close(self, answer: str) -> str:
        """The row ended with ``answer``, its whole decoded text: fix the content; return what is left to show."""
        content = answer.lstrip()
        cut = self._first_stop(content)
        self.stopped = cut is not None
        content = (content if cut is None else content[:cut]).rstrip()
        shown, self.text, self.shown = self.text[: self.shown], content, len(content)
        return content[len(shown) :] if content.startswith(shown) else ""

    @property
    def content(self) -> str:
        return self.text

    def _first_stop(self, text: str) -> int | None:
        return min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=None)

    def _show(self, end: int) -> str:
        if end <= self.shown:
            return ""
        piece, self.shown = self.text[self.shown : end], end
        return piece


__all__ = ["TextStream"]
