"""Tokenization of training samples with and without the encode memo, side by side: ``python -m
llava_stf.bench.tokenize [--data FILE --tokenizer DIR] [--records N] [--repeats K] [--template NAME]``.

``llava_stf.data.tokenization`` encodes a sample span by span (system prompt, role tags, each message); the system
prompt, the role tags and instruction suffixes repeat in every sample, so their encodings are remembered per tokenizer
(``tokenization.MEMO_ENTRIES``). This times ``tokenize_conversation`` over the same records with the memo off
(``MEMO_ENTRIES = 0``) and on, alternating ``--repeats`` times, and prints the median ms per sample of each and their
ratio. The first pass with the memo on starts empty (what one epoch of a dataset loader sees first). Default data:
a generated world's stage-2 records (``llava_stf.data.synthetic``) and a byte-level BPE trained on them; pass
``--data playground/data/llava_v1_5_mix665k.json --tokenizer lmsys/vicuna-7b-v1.5`` for real ones (images are
not read).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from ..data import tokenization
from ..data.conversation import get_template, normalize_record
from ..data.tokenization import SkippedSample, tokenize_conversation
from ..errors import UserError, add_debug_flag, run_main


class _Image:
    """The image token spec of LLaVA-1.5: 576 image ids per ``<image>`` (the count does not change the timing)."""

    image_token_id = 0
    num_image_tokens = 576


def load(args) -> tuple[list, object]:
    """(normalised conversations, tokenizer) from ``--data``/``--tokenizer`` or a generated world (in a temporary
    folder, removed after reading)."""
    from transformers import AutoTokenizer

    if args.data is None:
        from ..data.synthetic import generate
        from ..testing import tiny_tokenizer

        with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as folder:
            generate(Path(folder), num_train=args.records, num_eval=0, image_size=32)
            records = json.loads((Path(folder) / "instruct.json").read_text())
        texts = [t["value"] for r in records for t in r["conversations"]]
        tokenizer = tiny_tokenizer(1024, corpus=texts + [get_template(args.template).system])
    else:
        records = json.loads(Path(args.data).read_text())
        if not isinstance(records, list):
            raise UserError(f"{args.data}: expected a JSON list of LLaVA records, got {type(records).__name__}")
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    conversations = []
    for record in records[: args.records]:
        try:
            conversations.append(normalize_record(record))
        except (ValueError, KeyError, TypeError):
            continue  # malformed records are the validator's business (python -m llava_stf.data.validate)
    if not conversations:
        raise UserError(f"no usable records among the first {args.records}")
    return conversations, tokenizer


def time_pass(conversations: list, tokenizer, template, fresh: bool) -> float:
    """ms per sample of one pass (``fresh``: the memo emptied first)."""
    if fresh:
        tokenization._MEMO.pop(tokenizer, None)
    start = time.perf_counter()
    for turns in conversations:
        try:
            tokenize_conversation(turns, template, tokenizer, _Image())
        except SkippedSample:
            pass
    return (time.perf_counter() - start) / len(conversations) * 1e3


def run(args: argparse.Namespace) -> int:
    template = get_template(args.template)
    conversations, tokenizer = load(args)
    size = tokenization.MEMO_ENTRIES
    off, on, first = [], [], []
    try:
        for k in range(args.repeats):
            tokenization.MEMO_ENTRIES = 0
            off.append(time_pass(conversations, tokenizer, template, fresh=True))
            tokenization.MEMO_ENTRIES = size
            (first if k == 0 else on).append(time_pass(conversations, tokenizer, template, fresh=k == 0))
    finally:
        tokenization.MEMO_ENTRIES = size
    on = on or first
    base = statistics.median(off)
    print(f"{len(conversations)} records, template {args.template}, {args.repeats} passes each (median ms/sample)")
    print(f"  memo off                 {base:7.3f}")
    print(f"  memo on, first pass      {first[0]:7.3f}   ({base / first[0]:.2f}x)")
    print(f"  memo on, later passes    {statistics.median(on):7.3f}   ({base / statistics.median(on):.2f}x)")
    print(f"  remembered texts: {len(tokenization._MEMO.get(tokenizer, {}))} (MEMO_ENTRIES {size})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_stf.bench.tokenize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a LLaVA JSON file (default: a generated world's stage-2 records)")
    parser.add_argument("--tokenizer", help="with --data: a tokenizer folder or hub id")
    parser.add_argument("--records", type=int, default=2000, help="records timed (default 2000)")
    parser.add_argument("--repeats", type=int, default=5, help="passes per setting, alternating (default 5)")
    parser.add_argument("--template", default="vicuna_v1", help="conversation template (default vicuna_v1)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if (args.data is None) != (args.tokenizer is None):
        parser.error("--data and --tokenizer go together")
    if args.records < 1 or args.repeats < 1:
        parser.error("--records and --repeats must be >= 1")
    return run_main(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
