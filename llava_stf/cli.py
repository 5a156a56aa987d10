"""``llava-stf <command> [arguments ...]``: one console script in front of the package's entry points.

Each command hands its arguments to an existing ``main(argv)``, so ``llava-stf train --config finetune`` is
``python -m llava_stf.train.run --config finetune`` and ``llava-stf <command> --help`` is that module's own help.
Only the chosen command's module is imported (``llava-stf --help`` imports none of them). The exit status is the
command's return value (``None`` counts as 0); no command or an unknown one is an error (status 2).
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    module: str  # imported on use; its ``main(argv)`` runs the command
    summary: str  # the one line ``llava-stf --help`` shows

    @property
    def python_m(self) -> str:
        """The equivalent ``python -m`` target (a package runs its ``__main__``)."""
        return self.module.removesuffix(".__main__")


COMMANDS: dict[str, Command] = {
    "train": Command("llava_stf.train.run", "train one stage from YAML recipes and flags (pretrain, finetune, lora)"),
    "eval": Command("llava_stf.eval.__main__", "answer, merge and score the LLaVA-1.5 benchmarks; print the tables"),
    "chat": Command("llava_stf.serve.cli", "chat with a checkpoint about an image, streamed"),
    "serve": Command("llava_stf.serve.api", "an OpenAI-compatible API (chat completions, streaming, batched)"),
    "web": Command("llava_stf.serve.web", "a web demo (Gradio): chat about an image in the browser, streamed"),
    "convert": Command("llava_stf.convert", "convert released LLaVA / LLaVA-STF checkpoints; export to llava-hf"),
    "validate": Command("llava_stf.data.validate", "check a LLaVA training set before a long run"),
    "demo": Command("llava_stf.demo.__main__", "the offline demo: generated world, two-stage training, eval, chat"),
    "presets": Command("llava_stf.model.presets", "list the model presets: image tokens and parameter counts"),
    "flops": Command("llava_stf.bench.flops", "analytic prefill FLOPs of presets side by side"),
}
PROG = "llava-stf"


def usage() -> str:
    """The command list that ``--help`` prints, with each command's ``python -m`` equivalent."""
    width, summary_width = max(map(len, COMMANDS)), max(len(c.summary) for c in COMMANDS.values())
    lines = [f"usage: {PROG} <command> [arguments ...]", "", "commands:"]
    lines += [f"  {n:{width}}  {c.summary:{summary_width}}  python -m {c.python_m}" for n, c in COMMANDS.items()]
    lines += ["", f"{PROG} <command> --help shows the command's own arguments."]
    return "\n".join(lines)


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    print(usage(), file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run ``argv[0]``'s command with the rest of ``argv``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        return _fail(f"no command given; choose one of {', '.join(COMMANDS)}")
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help"):
        print(usage())
        return 0
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; choose one of {', '.join(COMMANDS)}"
        return _fail(f"unknown command {name!r}{hint}")
    target = importlib.import_module(COMMANDS[name].module)
    # argparse names the program after sys.argv[0]: make the commands' usage lines read "llava-stf <command>".
    saved, sys.argv[0] = sys.argv[0], f"{PROG} {name}"
    try:
        status = target.main(rest)
    finally:
        sys.argv[0] = saved
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
