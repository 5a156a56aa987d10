"""LoRA stage-2 training throughput at real shapes: a few optimizer steps per projector, side by side.

Each projector gets a freshly initialised model (random weights, ``--dtype``, built on ``--device``), the recipe's
``lora`` stage (``train.stages``: LoRA on the LLM, the projector fully trained, the tower frozen), activation
checkpointing and AdamW, and the same random batch: one image plus ``--text-tokens`` supervised text tokens per row.
Reported after ``--warmup`` untimed steps: samples/s, LLM tokens/s and peak memory (CUDA ``max_memory_allocated``;
not measured on CPU). ``llava_stf.bench.train`` measures the whole recipe (data, collator, Trainer) on small shapes;
this measures the step at 7B shapes without writing 7B-sized tower checkpoints first.

    python -m llava_stf.bench.lora_steps --preset llava-v1.5-7b --dtype bf16 --device cuda
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from ..model import LlavaStfForConditionalGeneration
from ..train.stages import apply_stage, get_stage, wrap_lora
from .variants import DTYPES, add_shape_arguments, base_config, variant_config, write_json


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure(spec: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    config = variant_config(base_config(args.preset, args.size), spec)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaStfForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    stage = get_stage("lora")
    apply_stage(model, stage)
    model.activation_checkpointing_enable()
    model = wrap_lora(model, stage, r=args.lora_r, alpha=2 * args.lora_r, dropout=0.05).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    g = torch.Generator().manual_seed(0)
    n_img, size = config.num_image_tokens, config.vision_config.image_size
    text = torch.randint(3, 30000, (args.batch, args.text_tokens), generator=g)
    ids = torch.cat([text[:, :8], torch.full((args.batch, n_img), config.image_token_id), text[:, 8:]], dim=1)
    labels = ids.masked_fill(ids == config.image_token_id, -100)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = torch.randn(args.batch, 3, size, size, generator=g).to(device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start = sync(device)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = sync(device) - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    row = {"projector": spec, "image_tokens": n_img, "samples_per_s": args.steps * args.batch / seconds}
    row.update(tokens_per_s=args.steps * ids.numel() / seconds, peak_gib=peak, final_loss=float(loss.detach()))
    del model, optimizer, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--projectors", nargs="+", default=["mlp2x_gelu", "mbtf_stf"], help="the first is the base")
    add_shape_arguments(parser, "tiny")
    for name, default in [("batch", 8), ("text-tokens", 128), ("steps", 4), ("warmup", 2), ("lora-r", 128)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rows = [measure(spec, args, device, dtype) for spec in args.projectors]  # one model at a time
    print(
        f"lora stage, {args.preset or args.size} shapes, {args.dtype} on {device}, batch {args.batch} x (1 image + "
        f"{args.text_tokens} text tokens), activation checkpointing, {args.steps} timed steps after {args.warmup}"
    )
    print(f"{'projector':12} {'img tok':>7} {'samples/s':>10} {'tokens/s':>10} {'peak GiB':>9} {'x base':>7}")
    for r in rows:
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        ratio = r["samples_per_s"] / rows[0]["samples_per_s"]
        print(f"{r['projector']:12} {r['image_tokens']:>7} {r['samples_per_s']:>10.2f} {r['tokens_per_s']:>10.0f} "
              f"{peak:>9} {ratio:>6.2f}x")  # fmt: skip
    write_json(args.json, args, rows)
    return rows


if __name__ == "__main__":
    main()
