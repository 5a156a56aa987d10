"""Evaluation throughput: answers/s of the eval engine at batch 1 (LLaVA's loop) against larger batches, one run.

The same model answers the same short-answer questions (images on disk, GQA-style prompts in the vicuna_v1 template)
through ``llava_stf.eval.engine.run_shard`` (image decoding, left-padded batched greedy generation, append + fsync
of every batch), once per batch size. Models have random weights, so EOS is suppressed and every answer is exactly
``--max-new-tokens`` long: each batch size does the same work. Model loading and a warm-up batch are not timed;
the best of ``--repeats`` interleaved runs is kept, against noise from other jobs on a shared machine.

    python -m llava_stf.bench.eval                                   # tiny model, CPU
    python -m llava_stf.bench.eval --model small --batch-sizes 1 8 16
    python -m llava_stf.bench.eval --model llava-stf-7b --device cuda  # 7B shapes (any configs/model preset), fp16
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ..eval.engine import Sample, Shard, run_shard
from ..generation import GenerationSettings, Generator, Request, default_device
from ..model import LlavaStfConfig, LlavaStfForConditionalGeneration
from ..model.presets import load_preset
from ..testing import make_image, tiny_config, tiny_processor, tiny_text_config, tiny_tokenizer, tiny_vision_config

QUESTIONS = [
    "What color is the car on the left?",
    "Is the man wearing a hat?",
    "How many people are in the picture?",
    "Which side of the photo is the tree on?",
    "What is the woman holding in her right hand?",
    "Are there any clouds in the sky?",
]


def _config(name: str, tokenizer) -> LlavaStfConfig:
    if name == "tiny":
        return tiny_config(tokenizer, "mbtf_stf")
    if name == "small":  # CPU-sized: 64 px images in 8 px patches (16 image tokens), LLM hidden 256 x 4 layers
        return LlavaStfConfig(
            vision_config=tiny_vision_config(hidden_size=64, intermediate_size=128, image_size=64, patch_size=8),
            text_config=tiny_text_config(len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            projector_type="mbtf_stf",
        )
    config = load_preset(name)  # real shapes; the tiny tokenizer's ids all fit the 32064-token vocabulary
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    return config


def build(name: str, device: torch.device, dtype: torch.dtype) -> Generator:
    """A random-weight model + processor: ``tiny``, ``small`` or a ``configs/model`` preset (real shapes)."""
    tokenizer = tiny_tokenizer()
    config = _config(name, tokenizer)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaStfForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    return Generator(model, tiny_processor(config, tokenizer))


def samples(folder: Path, count: int) -> list[Sample]:
    out = []
    for i in range(count):
        image = folder / f"{i % 8}.jpg"
        if not image.exists():
            make_image(i, (480 - 20 * (i % 8), 360 + 10 * (i % 5))).save(image)
        text = QUESTIONS[i % len(QUESTIONS)] + "\nAnswer the question using a single word or phrase."
        out.append(Sample(f"{i}#0", i, text, text, image))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, small, or a configs/model preset (e.g. llava-stf-7b)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None)
    parser.add_argument("--repeats", type=int, default=2, help="best of N runs per batch size (shared machines)")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    generator = build(args.model, device, dtype)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)
    params = sum(p.numel() for p in generator.model.parameters())
    print(
        f"model {args.model}: {params / 1e6:.1f}M params, {generator.processor.num_image_tokens} image tokens, "
        f"{device} {str(dtype).removeprefix('torch.')}, threads {torch.get_num_threads()}; {args.questions} "
        f"questions x {args.max_new_tokens} new tokens (EOS suppressed)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        questions = samples(Path(tmp), args.questions)
        warm = [Request.single(s.text, make_image(0)) for s in questions[: max(args.batch_sizes)]]
        generator.generate(warm, settings)
        print(f"{'batch':>5} {'answers/s':>10} {'tokens/s':>9} {'vs batch ' + str(args.batch_sizes[0]):>11}")
        rates = {b: 0.0 for b in args.batch_sizes}
        for repeat in range(args.repeats):  # interleaved, so a busy spell on the machine hits every batch size
            for batch_size in args.batch_sizes:
                answers = Path(tmp) / f"r{repeat}-b{batch_size}" / "answers.jsonl"
                report = run_shard(
                    questions,
                    answers,
                    lambda: generator,
                    model_id=args.model,
                    settings=settings,
                    batch_size=batch_size,
                    shard=Shard(),
                    progress=False,
                )
                rates[batch_size] = max(rates[batch_size], report.answers_per_second)
        base = rates[args.batch_sizes[0]]
        for batch_size, rate in rates.items():
            print(f"{batch_size:>5} {rate:>10.2f} {rate * args.max_new_tokens:>9.1f} {rate / base:>10.2f}x")


if __name__ == "__main__":
    main()
