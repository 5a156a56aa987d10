"""Measured prefill latency, decode speed, peak memory and KV-cache bytes per image, side by side in one run.

Every variant (``projector[+reducer]``) shares one randomly initialised vision tower, LLM and LM head (only the
projector differs) and gets the same input: one image and ``--text-tokens`` text tokens per row, ``--batch`` equal
rows (KV-cache bytes are reported per image, decode tokens/s over the whole batch). Prefills run
round-robin over the variants (so load changes hit all alike); forward hooks split the time to first token into
tower, reducer, projector and LLM. Reported next to the measured LLM prefill speed-up over the first variant: its
analytic FLOPs ratio (``llava_stf.flops``, with PruMerge's measured token count). CUDA peak memory is measured above the
resident weights; on CPU it is not measured.

    python -m llava_stf.bench.latency --threads 1                                  # CPU (7B / 4 widths), minutes
    python -m llava_stf.bench.latency --preset llava-v1.5-7b --dtype bf16 --device cuda   # 7B shapes, random init
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList

from ..flops import count_flops
from ..model import LlavaStfConfig
from ..model.reducers import REDUCERS
from .timing import Clock, prefill
from .variants import DTYPES, add_shape_arguments, base_config, build, lab_variants, write_json

VARIANTS = ["mlp2x_gelu", "mbtf_stf", "mlp2x_gelu+prumerge", "mlp2x_gelu+prumerge_plus", "mlp2x_gelu+fastv"]


@dataclass
class Row:
    spec: str
    image_tokens: int  # image tokens entering the LLM
    llm_tokens: int  # tokens through the last LLM layer
    times: dict[str, float]  # median seconds: prefill, vision, reducer (tower end to projector), projector, llm
    decode_tps: float
    kv_bytes: int  # KV cache of one image's row
    peak_bytes: int | None  # CUDA: peak memory above the resident weights during one prefill
    llm_flops: int
    prefill_flops: int  # the whole prefill (tower, projector, reducer, LLM, LM head): what TTFT pays for


@torch.no_grad()
def measure(base: LlavaStfConfig, args, device: torch.device) -> list[Row]:
    clock, models = Clock(device), build(base, args.variants, device, DTYPES[args.dtype])
    size, g = base.vision_config.image_size, torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, size, size, generator=g).to(device, DTYPES[args.dtype]).expand(args.batch, -1, -1, -1)
    text = torch.randint(3, 30000, (args.text_tokens,), generator=g).to(device)
    half, ids = args.text_tokens // 2, []
    for _, config, model in models:  # an adaptive reducer's prompt holds the image's own count (untimed here)
        n = len(model.get_image_features(pixel_values=pixels[:1]).pooler_output[0])
        image = torch.full((n,), config.image_token_id, device=device)
        ids.append(torch.cat([text[:half], image, text[half:]])[None].expand(args.batch, -1))
    runs = [[] for _ in models]
    for repeat in range(args.repeats + 1):  # the first round warms up
        for i, (_, _, model) in enumerate(models):
            runs[i] += [prefill(model, ids[i], pixels, clock)[0]] if repeat else []
    rows = []
    for (spec, config, model), prompt, samples in zip(models, ids, runs):
        resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _, out, llm_tokens = prefill(model, prompt, pixels, clock)
        peak = torch.cuda.max_memory_allocated(device) - resident if device.type == "cuda" else None
        kv = sum(t.numel() * t.element_size() for kv in out.cache.layers for t in (kv.keys, kv.values)) // args.batch
        clock.steps = []
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), pixel_values=pixels, do_sample=False,
                       max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0,
                       logits_processor=LogitsProcessorList([clock]))  # fmt: skip
        n_text = args.text_tokens
        image_tokens = prompt.shape[1] - n_text  # FastV drops them later, inside the LLM
        selected = image_tokens - 1 if config.adaptive_image_tokens else None
        times = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
        decode = args.batch * (len(clock.steps) - 1) / (clock.steps[-1] - clock.steps[0])
        flops = count_flops(config, args.text_tokens, reducer_tokens=selected)
        rows.append(Row(spec, image_tokens, llm_tokens, times, decode, kv, peak, flops.llm, flops.full))
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=VARIANTS,
                        help="projector[+reducer[@tokens]]; the first is the base")  # fmt: skip
    lab = "instead of --variants: mlp2x_gelu, then each reducer at each --tokens budget ('all': every one)"
    parser.add_argument("--reducers", nargs="+", default=None, help=lab)
    parser.add_argument("--tokens", nargs="+", type=int, default=[64, 192], help="token budgets for --reducers")
    parser.add_argument("--also", nargs="+", default=[], help="with --reducers: more variants (e.g. mbtf_stf)")
    add_shape_arguments(parser, "cpu")
    for name, default in [("text-tokens", 40), ("new-tokens", 16), ("repeats", 3), ("threads", 0), ("batch", 1)]:
        parser.add_argument(f"--{name}", type=int, default=default)  # threads: CPU threads (1 is steadier when shared)
    parser.add_argument("--json", default=None, help="also write the rows (and the run's settings) to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reducers:
        names = sorted(REDUCERS) if args.reducers == ["all"] else args.reducers
        args.variants = lab_variants("mlp2x_gelu", names, args.tokens) + args.also
    device = torch.device(args.device)
    rows = measure(base_config(args.preset, args.size), args, device)
    ref = rows[0]
    print(f"{args.preset or args.size} shapes, {args.dtype} on {device}, batch {args.batch} x (1 image + "
          f"{args.text_tokens} text tokens), random weights; median ms; LLM prefill speed-up and FLOPs ratio vs "
          f"{ref.spec}")  # fmt: skip
    head = "img LLM TTFT vision reduce proj LLM speedup FLOPs-x eff red% proj% dec-t/s KV-MB peak-GB".split()
    print(("{:26}" + "{:>8}" * len(head)).format("variant", *head))
    for r in rows:
        t = {k: v * 1e3 for k, v in r.times.items()}
        speedup, flops = ref.times["llm"] / r.times["llm"], ref.llm_flops / r.llm_flops
        peak = "n/a" if r.peak_bytes is None else f"{r.peak_bytes / 2**30:.2f}"
        cells = [r.image_tokens, r.llm_tokens] + [f"{t[k]:.1f}" for k in ("prefill", "vision", "reducer", "projector")]
        cells += [f"{t['llm']:.1f}", f"{speedup:.2f}", f"{flops:.2f}", f"{speedup / flops:.0%}"]
        cells += [f"{t['reducer'] / t['prefill']:.1%}"]
        cells += [f"{t['projector'] / t['prefill']:.1%}", f"{r.decode_tps:.1f}", f"{r.kv_bytes / 2**20:.2f}", peak]
        print(("{:26}" + "{:>8}" * len(cells)).format(r.spec, *cells))
    for line in targets(rows):
        print(line)
    write_json(args.json, args, rows)
    return rows


def targets(rows: list[Row]) -> list[str]:
    """Per reduced variant: LLM prefill speed-up >= 80 % of its LLM FLOPs ratio, reducer time < 5 % of the prefill."""
    ref, lines = rows[0], []
    for r in rows[1:]:
        if "+" not in r.spec:
            continue
        eff = ref.times["llm"] / r.times["llm"] / (ref.llm_flops / r.llm_flops)
        overhead = r.times["reducer"] / r.times["prefill"]
        verdict = "meets" if eff >= 0.8 and overhead < 0.05 else "MISSES"
        lines.append(f"target {r.spec}: speed-up {eff:.0%} of the FLOPs ratio (>= 80%), reducer {overhead:.1%} of "
                     f"the prefill (< 5%): {verdict}")  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
