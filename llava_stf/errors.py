"""One error boundary for every entry point: an expected failure is one ``error: ...`` line and a non-zero exit.

Entry points (``train.run``, ``eval``, ``serve.cli``, ``convert``, ``data.validate``, ``demo``) wrap their work in
:func:`run_main`. Ordinary mistakes (a missing file, a malformed JSON line, a bad flag value, a corrupt image) raise
:class:`UserError` (or a ``ValueError`` / ``OSError`` naming the file or field) and reach the user as one line;
``--debug`` (or ``LLAVA_STF_DEBUG=1`` in the environment) shows the traceback instead. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

DEBUG_ENV = "LLAVA_STF_DEBUG"


class UserError(Exception):
    """Bad input the user can fix; the message names the file, record or field and says what was expected."""


# Expected failures: what bad input raises. A ValueError / OSError from our code names what is wrong.
EXPECTED: tuple[type[BaseException], ...] = (UserError, ValueError, OSError)


def debug_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(error: BaseException) -> str:
    """The error's message on one line (its type name when it has no message)."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        return f"{error.strerror}: {error.filename}"  # not "[Errno 2] ...: '/x'"
    return " ".join(str(error).split()) or type(error).__name__


def run_main(work: Callable[[], int | None], debug: bool = False) -> int:
    """Run ``work``; return its exit status (``None``: 0), 1 after an expected error, 130 after Ctrl-C."""
    try:
        return int(work() or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except EXPECTED as error:
        if debug_requested(debug):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1


def add_debug_flag(parser) -> None:
    """``--debug``: show the traceback of an error instead of one line."""
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")


__all__ = ["DEBUG_ENV", "EXPECTED", "UserError", "add_debug_flag", "debug_requested", "one_line", "run_main"]
