"""``python -m llava_stf.serve.cli``: chat with a llava_stf checkpoint about an image, streamed; terminal or script.

Usage::

    python -m llava_stf.serve.cli --model-path CKPT --image-file photo.jpg          # interactive, multi-turn
    python -m llava_stf.serve.cli --model-path CKPT --image-file https://host/photo.jpg --query "What is it?"
    printf 'What is it?\\nWhat colour is it?\\n' | python -m llava_stf.serve.cli --model-path CKPT --image-file x.png

The conversation template and the image mode are the ones saved with the checkpoint's processor
(``conversation_template``, ``image_aspect_ratio``), never guessed from its name; answers come from the same
``Generator`` as evaluation, greedy unless ``--temperature`` is above 0. Interactive (stdin is a terminal): a ``USER:``
prompt, the answer streamed after ``ASSISTANT:``; an empty line, end of input (Ctrl-D) or Ctrl-C at the prompt quits,
Ctrl-C during an answer stops it (the exchange is not kept). Scripts (``--query``, repeatable, or questions one per
line on a stdin that is not a terminal, up to an empty line or EOF): stdout holds only the answers, each ending with a
newline; messages go to stderr. Questions on stdin are decoded in stdin's encoding (UTF-8 unless the locale or
``PYTHONIOENCODING`` says otherwise), strictly: a line that does not decode stops a script with an error naming the
line and the byte (the answers before it are kept on stdout), and is refused at the interactive prompt. Replacing the
bad bytes instead would answer a question the user did not ask. The image goes through the package's one image
policy (``data.images.ImageLimits``: ``--max-image-bytes``, ``--max-image-pixels``, ``--max-aspect-ratio``, for files
and URLs alike, with the training defaults).

Errors go through the shared boundary (``llava_stf.errors.run_main``): every expected failure (image file missing,
corrupt or over the limits, URL unreachable, too slow or too large, a folder that is not a llava_stf checkpoint, no
CUDA or bitsandbytes for ``--device cuda`` / ``--load-4bit``, a bad flag value, undecodable input) prints one
``error:`` line on stderr and exits with status 1. ``--debug`` (or ``LLAVA_STF_DEBUG=1``) shows the traceback instead,
and prints each prompt and answer as a JSON line on stderr.

``--reducer NAME [--reducer-kwargs JSON | --tokens N]`` chats with the checkpoint under another token reducer (``none``
removes its own), loaded as evaluation loads it (``llava_stf.reducer_choice``); the mapping of ``--tokens`` is printed.
"""

from __future__ import annotations

import argparse
import codecs
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image

from ..data.images import IMAGE_TOO_LARGE, ImageLimits
from ..errors import DEBUG_ENV, UserError, debug_requested, run_main
from ..generation import GenerationSettings, Generator, check_checkpoint, default_device, load_checkpoint
from ..loading import DTYPES, load_config
from ..reducer_choice import ReducerChoice, add_reducer_flags, choice_from_args
from .chat import ChatError, ChatSession
from .images import DEFAULT_TIMEOUT, ImageSourceError, open_image_source

USER, ASSISTANT = "USER: ", "ASSISTANT: "
LIMIT_FLAGS = "--max-image-bytes, --max-image-pixels, --max-aspect-ratio"


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """How a checkpoint is loaded: ``--device``, ``--dtype``, ``--load-8bit/4bit``, ``--reducer/--tokens``."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: float16 on CUDA, else 32")
    bits = parser.add_mutually_exclusive_group()
    bits.add_argument("--load-8bit", action="store_true", help="quantize the LLM to 8 bits (bitsandbytes, CUDA)")
    bits.add_argument("--load-4bit", action="store_true", help="quantize the LLM to 4-bit NF4 (bitsandbytes, CUDA)")
    add_reducer_flags(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llava_stf.serve.cli", description=__doc__.splitlines()[0].split(": ", 1)[1]
    )
    parser.add_argument("--model-path", type=Path, required=True, help="checkpoint folder (model + LlavaStfProcessor)")
    parser.add_argument("--image-file", help="image path or http(s) URL for the first question (omit: text only)")
    parser.add_argument("--query", action="append", help="ask this and exit; repeat for more turns (stdin unread)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0 samples (LLaVA: 0.2)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass when sampling")
    parser.add_argument("--seed", type=int, default=None, help="seed torch, to repeat sampled answers")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    add_model_flags(parser)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to download an image URL")
    limits = ImageLimits()
    parser.add_argument(
        "--max-image-bytes", type=int, default=limits.max_bytes, help="largest image file or download (64 MiB)"
    )
    parser.add_argument("--max-image-pixels", type=int, default=limits.max_pixels, help="largest width * height")
    parser.add_argument(
        "--max-aspect-ratio", type=float, default=limits.max_aspect_ratio, help="largest long side / short side"
    )
    # Not errors.add_debug_flag: the chat's --debug also prints the prompts and answers.
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"print prompts and answers as JSON lines on stderr; the traceback of an error (or set {DEBUG_ENV}=1)",
    )
    return parser


def resolve_device(name: str, load_in_bits: int | None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a clear error for CUDA or quantization that cannot run here."""
    device = default_device() if name == "auto" else torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda: no CUDA device is available (torch {torch.__version__}); use --device cpu")
    if load_in_bits is not None:
        missing = [] if importlib.util.find_spec("bitsandbytes") else ["the bitsandbytes package (pip install it)"]
        if device.type != "cuda":
            missing.append(f"a CUDA device (the device is {device})")
        if missing:
            raise UserError(f"--load-{load_in_bits}bit needs bitsandbytes and CUDA; missing: {', '.join(missing)}")
    return device


def check_model_path(path: Path) -> None:
    """A one-line error unless ``path`` is a llava_stf checkpoint folder (before anything slow is loaded)."""
    check_checkpoint(path)  # FileNotFoundError / ValueError with a one-line reason


def load_generator(
    args: argparse.Namespace, device: torch.device, load_in_bits: int | None, reducer: ReducerChoice | None = None
) -> Generator:
    """The checkpoint's ``Generator``; any failure while loading it becomes a one-line ``UserError``."""
    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    try:
        return Generator(*load_checkpoint(args.model_path, device, dtype, load_in_bits, reducer=reducer))
    except Exception as err:  # a loading boundary: any failure is about the checkpoint, reported in one line
        if debug_requested(args.debug):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot load {args.model_path}: {first}") from None


def read_questions(args: argparse.Namespace, interactive: bool, stdin: TextIO) -> Iterator[str]:
    """The user's questions, up to the first empty one or the end of input."""
    if args.query:
        lines: Iterator[str] = iter(args.query)
    elif interactive:
        lines = _prompts()
    else:
        lines = script_lines(stdin)
    for line in lines:
        if not line.strip():
            return
        yield line


def script_lines(stdin: TextIO) -> Iterator[str]:
    """The lines of a non-terminal stdin, decoded strictly in its encoding, without their line ends.

    Raises:
        UserError: At the first line that does not decode, naming the line, the byte and the fix.
    """
    raw = getattr(stdin, "buffer", None)
    if raw is None:  # already text (a StringIO)
        yield from (line.rstrip("\r\n") for line in stdin)
        return
    encoding = codecs.lookup(stdin.encoding or "utf-8").name
    for number, line in enumerate(raw, 1):
        try:
            text = line.decode(encoding)
        except UnicodeDecodeError as err:
            raise UserError(
                f"stdin line {number} is not {encoding} text (byte 0x{line[err.start]:02x} at position "
                f"{err.start + 1}): convert the input (e.g. iconv -f latin1 -t {encoding}) or set PYTHONIOENCODING "
                "to its encoding"
            ) from None
        yield text.rstrip("\r\n")


def _prompts() -> Iterator[str]:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            line = input(USER)
            line.encode("utf-8")  # a terminal read with surrogateescape (C locale) keeps bad bytes as lone surrogates
        except EOFError:
            print()
            return
        except UnicodeError:  # input() decodes strictly in the terminal's encoding
            encoding = sys.stdin.encoding or "utf-8"
            print(f"error: that line is not valid {encoding} text; check the terminal's encoding", file=sys.stderr)
            continue
        yield line


class AnswerPrinter:
    """Stream callback that writes an answer as it arrives, without its leading whitespace (the returned answer is
    stripped), after an optional prefix."""

    def __init__(self, out: TextIO, prefix: str = ""):
        self.out, self.prefix, self.started = out, prefix, False

    def __call__(self, text: str) -> None:
        if not self.started:
            text = text.lstrip()
            if not text:
                return
            self.out.write(self.prefix)
            self.started = True
        self.out.write(text)
        self.out.flush()

    def finish(self) -> None:
        self.out.write(("" if self.started else self.prefix) + "\n")
        self.out.flush()


def chat(session: ChatSession, questions: Iterator[str], interactive: bool, debug: bool) -> int:
    """Answer ``questions`` in order; return the exit status (1 when a question was refused in a script)."""
    out, err = sys.stdout, sys.stderr
    answered = 0
    for raw in questions:
        question, removed = session.clean(raw)
        if removed:
            print(f"note: removed {', '.join(removed)} from the question (control tokens, not text)", file=err)
        if not question:
            continue
        printer = AnswerPrinter(out, ASSISTANT if interactive else "")
        try:
            answer = session.ask(question, stream=printer)
        except ChatError as error:
            print(f"error: {error}", file=err)
            if interactive:
                continue
            return 1
        except KeyboardInterrupt:
            if not interactive:
                raise
            printer.finish()
            print("(answer interrupted; not kept in the conversation)", file=err)
            continue
        printer.finish()
        if debug:
            record = {"turn": answered, "prompt": session.last_prompt, "answer": answer}
            print(json.dumps(record), file=err, flush=True)
        answered += 1
    return 0


def image_limits(args: argparse.Namespace) -> ImageLimits:
    """The image policy from the flags, with a one-line error naming a bad flag."""
    for flag, value in [
        ("--timeout", args.timeout),
        ("--max-image-bytes", args.max_image_bytes),
        ("--max-image-pixels", args.max_image_pixels),
    ]:
        if not value > 0:  # NaN too
            raise UserError(f"{flag} must be positive, got {value:g}")
    if not args.max_aspect_ratio >= 1:
        raise UserError(f"--max-aspect-ratio is long side / short side, at least 1; got {args.max_aspect_ratio:g}")
    return ImageLimits(args.max_image_pixels, args.max_aspect_ratio, args.max_image_bytes)


def open_image(source: str, timeout: float, limits: ImageLimits) -> Image.Image:
    """The chat's image; an image over the limits gets an error that names the flags that set them."""
    try:
        return open_image_source(source, timeout, limits)
    except ImageSourceError as error:
        if error.reason != IMAGE_TOO_LARGE:
            raise
        raise UserError(f"{error} (the limits: {LIMIT_FLAGS})") from error


def run(args: argparse.Namespace) -> int:
    load_in_bits = 8 if args.load_8bit else 4 if args.load_4bit else None
    device = resolve_device(args.device, load_in_bits)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    limits = image_limits(args)
    check_model_path(args.model_path)
    reducer = choice_from_args(args)
    if reducer is not None:  # an unknown name, a budget out of range: one line before anything loads
        print(reducer.resolve(load_config(args.model_path)).describe(), file=sys.stderr)
    image = None if args.image_file is None else open_image(args.image_file, args.timeout, limits)
    generator = load_generator(args, device, load_in_bits, reducer)
    session = ChatSession(generator, image, settings)
    processor, config = generator.processor, generator.model.config
    print(
        f"loaded {args.model_path}: projector {getattr(config, 'projector_type', '?')}, "
        f"reducer {getattr(config, 'reducer_type', None) or 'none'}, {generator.describe_image_tokens()}, "
        f"template {processor.conversation_template}, image mode {processor.image_aspect_ratio}, "
        f"{generator.device} {next(generator.model.parameters()).dtype}",
        file=sys.stderr,
    )
    if session.single_turn:
        print("note: a 'plain' (stage-1) checkpoint captions the image; questions are ignored", file=sys.stderr)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    interactive = not args.query and sys.stdin.isatty()
    if interactive:
        print("(an empty line or Ctrl-D quits)", file=sys.stderr)
    debug = debug_requested(args.debug)
    return chat(session, read_questions(args, interactive, sys.stdin), interactive, debug)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status (0 done, 1 error, 2 bad arguments, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a generated character gets '?'
    return run_main(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
