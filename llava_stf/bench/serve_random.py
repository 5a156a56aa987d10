"""``python -m llava_stf.bench.serve_random``: the load test (``bench.serve``) on random-weight checkpoints at a
preset's shapes, for a GPU.

What fewer image tokens save in serving shows where the LLM's prefill over them is the cost, at LLaVA-1.5-7B's shapes
on a GPU, not with the CPU demo's tiny models. This builds an ``mlp2x_gelu`` and an ``mbtf_stf`` checkpoint
(``variants.build``: one random vision tower and LLM shared by both, each its own random projector), saves each with a
processor (the tower's CLIP image size; a word-level tokenizer over the LLM's whole vocabulary, ``<image>`` at the
config's id), frees the device, and runs ``python -m llava_stf.bench.serve`` on the two with the server on
``--device`` in ``--dtype``, on generated images, so its targets (requests/s at concurrency 16 over 1; ``mbtf_stf``
over ``mlp2x_gelu``) are measured on that machine. Random weights answer random words, up to ``--max-tokens`` (or an
early EOS); answers are still compared across levels, but a change is reported, not failed: 16-bit greedy decoding
flips at near-ties with the batch (the GPU check's parity step measures how often). ``--size tiny`` on the CPU runs
the same path in seconds (the GPU check's dry run).

    python -m llava_stf.bench.serve_random --preset llava-v1.5-7b --dtype bf16 --device cuda --json serve.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ..data.conversation import IMAGE_TOKEN
from ..errors import UserError, add_debug_flag, run_main
from ..model import LlavaStfProcessor
from ..testing import tiny_image_processor
from . import serve
from .variants import DTYPES, add_shape_arguments, base_config, build

PROJECTORS = ("mlp2x_gelu", "mbtf_stf")
SERVER_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # ours -> the server's --dtype names
# The words of the Vicuna system prompt and the generated questions, so prompts tokenize to words, not <unk>.
_WORDS = (
    "A chat between a curious user and an artificial intelligence assistant . The assistant gives helpful , "
    "detailed , and polite answers to the user ' s questions . USER : ASSISTANT : What is shown in the image ? "
    "How many shapes are there ? What color is the triangle ?"
).split()


def word_tokenizer(vocab_size: int, image_token_id: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly ``vocab_size`` ids: ``<unk> <s> </s>`` (0, 1, 2, Vicuna's), the prompts'
    words, ``<image>`` at ``image_token_id``, and ``w<i>`` for every other id, so any id a random model generates
    decodes to a word; BOS is prepended, ``<unk>`` pads (as LLaVA)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    if not len(vocab) <= image_token_id < vocab_size:
        raise ValueError(f"image token id {image_token_id} must be in [{len(vocab)}, {vocab_size})")
    ids = {i: token for token, i in vocab.items()} | {image_token_id: IMAGE_TOKEN}
    vocab = {ids.get(i, f"w{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        model_max_length=4096,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def save_checkpoints(args: argparse.Namespace, work: Path) -> list[Path]:
    """The two random checkpoints, saved under ``work``; the device memory is freed before returning."""
    base = base_config(args.preset, args.size)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    tokenizer = word_tokenizer(base.text_config.vocab_size, base.image_token_index)
    image_processor = tiny_image_processor(base.vision_config.image_size)  # CLIP's preprocessing at that size
    paths = []
    for spec, config, model in build(base, list(PROJECTORS), device, dtype):
        path = work / spec
        model.save_pretrained(path)
        processor = LlavaStfProcessor(image_processor, tokenizer, num_image_tokens=config.num_image_tokens)
        processor.save_pretrained(path)
        paths.append(path)
        print(f"saved {spec} ({config.num_image_tokens} image tokens) to {path}", file=sys.stderr, flush=True)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llava_stf.bench.serve_random", description=__doc__.split("\n\n")[0]
    )
    add_shape_arguments(parser, "tiny")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per level")
    parser.add_argument("--requests", type=int, default=64, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=8, help="max_tokens of each request")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per level (stop sending after)")
    parser.add_argument("--work", type=Path, help="where the checkpoints go (default: a temporary folder, removed)")
    parser.add_argument("--json", type=Path, help="bench.serve's results")
    add_debug_flag(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    if any(level < 1 for level in args.levels) or args.requests < 1 or args.max_tokens < 1:
        raise UserError("--levels, --requests and --max-tokens must be >= 1")  # before minutes of building
    if args.device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda (the server's choices), got {args.device!r}")
    with tempfile.TemporaryDirectory(prefix="serve_random_", dir=args.work) as work:
        paths = save_checkpoints(args, Path(work))
        argv = ["--model-path", *map(str, paths), "--levels", *map(str, args.levels)]
        argv += ["--requests", str(args.requests), "--max-tokens", str(args.max_tokens), "--questions", "16"]
        argv += ["--time-limit", str(args.time_limit), "--engine-repeats", "0", "--no-answer-check"]
        argv += ["--server-args", f"--device {args.device} --dtype {SERVER_DTYPES[args.dtype]}"]
        return serve.main([*argv, *(["--json", str(args.json)] if args.json else [])])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
