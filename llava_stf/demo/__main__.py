"""``python -m llava_stf.demo``: the smallest honest end-to-end run of the package, offline, in seconds on a CPU.

It builds a tiny MBTF+STF model next to the LLaVA-1.5 baseline projector (random weights from the offline test kit),
saves and reloads both through transformers' Auto classes, processes one generated image, and greedily generates a
few tokens with the KV cache. The printed text is noise: the models are untrained. What it shows is the plumbing —
registry projector, placeholder expansion, save/load, generation — and the visual-token saving of STF.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from ..testing import make_image, tiny_config, tiny_model, tiny_processor, tiny_tokenizer

PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: <image>\nWhat is shown? ASSISTANT:"
)


def run(out_dir: Path, projectors: list[str], max_new_tokens: int) -> None:
    tokenizer = tiny_tokenizer()
    image = make_image(seed=0, size=(48, 40))
    print(f"{'projector':12} {'image tokens':>12} {'prompt tokens':>13} {'params':>8} {'gen s':>6}  output")
    for name in projectors:
        config = tiny_config(tokenizer, name)
        path = out_dir / name
        tiny_model(config).save_pretrained(path)
        tiny_processor(config, tokenizer).save_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        processor = AutoProcessor.from_pretrained(path)
        inputs = processor(images=[image], text=[PROMPT])
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
        text = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"{name:12} {config.num_image_tokens:>12} {inputs['input_ids'].shape[1]:>13} {n_params:>8,} "
            f"{seconds:>6.2f}  {text!r}"
        )
    print(f"checkpoints in {out_dir} (untrained weights: the text above is noise, the token counts are the point)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to save the tiny checkpoints (default: temp)")
    parser.add_argument("--projectors", nargs="+", default=["mlp2x_gelu", "mbtf_stf"])
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    if args.out is None:
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp), args.projectors, args.max_new_tokens)
    else:
        run(args.out, args.projectors, args.max_new_tokens)


if __name__ == "__main__":
    main()
