"""Numerical parity at real shapes and dtype: SDPA vs eager, a batch vs one by one, KV cache vs none.

Random weights (as ``bench.latency``): every variant shares one vision tower and LLM. ``--prompts`` rows, each with
its own random image and random text of different lengths around the image placeholders, left-padded into one batch.
Reported per variant: the largest |logit| difference between SDPA and eager on the batch's last positions, and the
fraction of prompts whose ``--new-tokens`` greedy tokens are identical (SDPA vs eager; batch vs each prompt alone;
with vs without the KV cache). Random weights give many near-ties, so a bf16 fraction below 100 % is expected noise
at some rate; the checks exist to catch systematic breaks (0 %), which padding or cache bugs produce.

    python -m llava_stf.bench.parity --preset llava-v1.5-7b --dtype bf16 --device cuda
"""

from __future__ import annotations

import argparse

import torch

from .variants import DTYPES, add_shape_arguments, base_config, build, write_json

VARIANTS = ["mlp2x_gelu", "mbtf_stf", "mlp2x_gelu+fastv"]


def make_prompts(config, n: int, text_range: tuple[int, int], g: torch.Generator) -> list[torch.Tensor]:
    """``n`` id rows: random text, the image placeholders, random text (lengths drawn from ``text_range``)."""
    rows = []
    for _ in range(n):
        before, after = (int(torch.randint(*text_range, (1,), generator=g)) for _ in range(2))
        text = torch.randint(3, 30000, (before + after,), generator=g)
        image = torch.full((config.num_image_tokens,), config.image_token_id)
        rows.append(torch.cat([text[:before], image, text[before:]]))
    return rows


def left_pad(rows: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def greedy(model, rows, pixels, new_tokens: int, **kwargs) -> list[list[int]]:
    ids, mask = left_pad(rows, pixels.device)
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False, pad_token_id=0,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)  # fmt: skip
    return out[:, ids.shape[1] :].tolist()


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


@torch.no_grad()
def measure(model, config, args, device, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    rows = make_prompts(config, args.prompts, (4, 4 + args.text_tokens), g)
    size = config.vision_config.image_size
    pixels = torch.randn(len(rows), 3, size, size, generator=g).to(device, dtype)
    ids, mask = left_pad(rows, device)
    logits, tokens = {}, {}
    for attn in ("eager", "sdpa"):  # sdpa last: the rest runs on the default implementation
        model.set_attn_implementation(attn)
        logits[attn] = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, logits_to_keep=1).logits
        tokens[attn] = greedy(model, rows, pixels, args.new_tokens)
    alone = [greedy(model, [r], pixels[i : i + 1], args.new_tokens)[0] for i, r in enumerate(rows)]
    uncached = greedy(model, rows, pixels, args.new_tokens, use_cache=False)
    return {
        "max_abs_logit_diff_sdpa_eager": float((logits["sdpa"].float() - logits["eager"].float()).abs().max()),
        "tokens_equal_sdpa_eager": agreement(tokens["sdpa"], tokens["eager"]),
        "tokens_equal_batch_vs_single": agreement(tokens["sdpa"], alone),
        "tokens_equal_cache_vs_none": agreement(tokens["sdpa"], uncached),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, help="projector[+reducer] (no adaptive reducer)")
    add_shape_arguments(parser, "tiny")
    for name, default in [("prompts", 8), ("new-tokens", 8), ("text-tokens", 24), ("threads", 0)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rows = []
    for spec, config, model in build(base_config(args.preset, args.size), args.variants, device, dtype):
        if config.adaptive_image_tokens:
            raise SystemExit(f"error: {spec}: adaptive token counts are not measured here")
        rows.append({"variant": spec, **measure(model, config, args, device, dtype)})
    print(f"{args.preset or args.size} shapes, {args.dtype} on {device}, {args.prompts} prompts, random weights")
    print(f"{'variant':24} {'max|dlogit| sdpa-eager':>23} {'same tokens: sdpa-eager':>24} {'batch-single':>13} "
          f"{'cache-none':>11}")  # fmt: skip
    for r in rows:
        print(f"{r['variant']:24} {r['max_abs_logit_diff_sdpa_eager']:>23.4g} {r['tokens_equal_sdpa_eager']:>24.0%} "
              f"{r['tokens_equal_batch_vs_single']:>13.0%} {r['tokens_equal_cache_vs_none']:>11.0%}")  # fmt: skip
    write_json(args.json, args, rows)
    return rows


if __name__ == "__main__":
    main()
