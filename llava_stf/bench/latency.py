"""Measured prefill latency, decode speed, peak memory and KV-cache bytes per image, side by side in one run.

Every variant (``projector[+reducer]``) shares one randomly initialised vision tower, LLM and LM head (only the
projector differs) and gets the same input: one image and ``--text-tokens`` text tokens per row, ``--batch`` equal
rows (KV-cache bytes are reported per image, decode tokens/s over the whole batch). Prefills run
round-robin over the variants (so load changes hit all alike); forward hooks split the time to first token into
tower, reducer, projector and LLM. Reported next to the measured LLM prefill speed-up over the first variant: its
analytic FLOPs ratio (``llava_stf.flops``, with PruMerge's measured token count). CUDA peak memory is measured above the
resident weights; on CPU it is not measured. The machine's load average is printed before and after the run.

AnyRes (LLaVA-NeXT): a NeXT preset, or ``--anyres`` on the ``--size`` shapes (the NeXT presets' pinpoints), with one
``--image-size H W`` image (default 2 x 2 crops: 672x672 at 336 px, i.e. 4 tiles + the base image); the prompt holds
``config.image_token_count(H, W)`` placeholders (newlines included) and the default variants are the two NeXT
presets' projectors, with the target of issue 14 (LLM prefill speed-up >= 85 % of its FLOPs ratio, projector < 5 %
of the prefill).

    python -m llava_stf.bench.latency --threads 1                                  # CPU (7B / 4 widths), minutes
    python -m llava_stf.bench.latency --preset llava-v1.5-7b --dtype bf16 --device cuda   # 7B shapes, random init
    python -m llava_stf.bench.latency --anyres --threads 1                         # NeXT 7B / 4 widths, 672x672
    python -m llava_stf.bench.latency --preset llava-v1.6-vicuna-7b --dtype bf16 --device cuda --image-size 672 672
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList

from ..flops import count_flops, default_image_size, image_geometry
from ..model import LlavaStfConfig
from ..model.reducers import REDUCERS
from .timing import Clock, prefill
from .variants import DTYPES, add_shape_arguments, base_config, build, image_inputs, lab_variants, write_json

VARIANTS = ["mlp2x_gelu", "mbtf_stf", "mlp2x_gelu+prumerge", "mlp2x_gelu+prumerge_plus", "mlp2x_gelu+fastv"]
ANYRES_VARIANTS = ["mlp2x_gelu", "mbtf_stf"]  # llava-v1.6-vicuna-7b and llava-stf-next-7b


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
    crops: int = 1  # crops through the vision tower and the projector (AnyRes: tiles + base image)


@torch.no_grad()
def measure(base: LlavaStfConfig, args, device: torch.device) -> list[Row]:
    clock, models = Clock(device), build(base, args.variants, device, DTYPES[args.dtype])
    height, width = args.image_size or default_image_size(base)
    g = torch.Generator().manual_seed(0)
    inputs = image_inputs(base, height, width, args.batch, device, DTYPES[args.dtype], generator=g)
    pixels, sizes = inputs["pixel_values"], inputs.get("image_sizes")
    text = torch.randint(3, 30000, (args.text_tokens,), generator=g).to(device)
    half, ids = args.text_tokens // 2, []
    for _, config, model in models:  # the prompt holds the image's own count (AnyRes: newlines; PruMerge: adaptive)
        n = len(model.get_image_features(**{k: v[:1] for k, v in inputs.items()}).pooler_output[0])
        image = torch.full((n,), config.image_token_id, device=device)
        ids.append(torch.cat([text[:half], image, text[half:]])[None].expand(args.batch, -1))
    runs = [[] for _ in models]
    for repeat in range(args.repeats + 1):  # the first round warms up
        for i, (_, _, model) in enumerate(models):
            runs[i] += [prefill(model, ids[i], pixels, clock, sizes)[0]] if repeat else []
    rows = []
    for (spec, config, model), prompt, samples in zip(models, ids, runs):
        resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _, out, llm_tokens = prefill(model, prompt, pixels, clock, sizes)
        peak = torch.cuda.max_memory_allocated(device) - resident if device.type == "cuda" else None
        kv = sum(t.numel() * t.element_size() for kv in out.cache.layers for t in (kv.keys, kv.values)) // args.batch
        clock.steps = []
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **inputs, do_sample=False,
                       max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0,
                       logits_processor=LogitsProcessorList([clock]))  # fmt: skip
        n_text = args.text_tokens
        image_tokens = prompt.shape[1] - n_text  # FastV drops them later, inside the LLM
        selected = image_tokens - 1 if config.adaptive_image_tokens else None
        times = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
        decode = args.batch * (len(clock.steps) - 1) / (clock.steps[-1] - clock.steps[0])
        flops = count_flops(config, args.text_tokens, reducer_tokens=selected, image_size=(height, width))
        rows.append(Row(spec, image_tokens, llm_tokens, times, decode, kv, peak, flops.llm, flops.full, flops.crops))
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=None,
                        help=f"projector[+reducer[@tokens]]; the first is the base (default {VARIANTS}, AnyRes "
                             f"{ANYRES_VARIANTS})")  # fmt: skip
    lab = "instead of --variants: mlp2x_gelu, then each reducer at each --tokens budget ('all': every one)"
    parser.add_argument("--reducers", nargs="+", default=None, help=lab)
    parser.add_argument("--tokens", nargs="+", type=int, default=[64, 192], help="token budgets for --reducers")
    parser.add_argument("--also", nargs="+", default=[], help="with --reducers: more variants (e.g. mbtf_stf)")
    add_shape_arguments(parser, "cpu")
    parser.add_argument("--anyres", action="store_true", help="LLaVA-NeXT AnyRes on the --size shapes")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                        help="AnyRes: the image in pixels (default: 2 x 2 crops, 672 672 at 336-px crops)")  # fmt: skip
    for name, default in [("text-tokens", 40), ("new-tokens", 16), ("repeats", 3), ("threads", 0), ("batch", 1)]:
        parser.add_argument(f"--{name}", type=int, default=default)  # threads: CPU threads (1 is steadier when shared)
    parser.add_argument("--json", default=None, help="also write the rows (and the run's settings) to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reducers:
        names = sorted(REDUCERS) if args.reducers == ["all"] else args.reducers
        args.variants = lab_variants("mlp2x_gelu", names, args.tokens) + args.also
    device, base = torch.device(args.device), base_config(args.preset, args.size, args.anyres)
    args.variants = args.variants or (ANYRES_VARIANTS if base.anyres else VARIANTS)
    load = os.getloadavg()[0]
    rows = measure(base, args, device)
    ref, load = rows[0], f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}"
    image = "1 image"
    if base.anyres:
        height, width = args.image_size or default_image_size(base)
        image = f"1 AnyRes {height}x{width} image ({image_geometry(base, height, width)[0]} crops)"
    print(f"{args.preset or args.size} shapes, {args.dtype} on {device}, batch {args.batch} x ({image} + "
          f"{args.text_tokens} text tokens), random weights; median ms; LLM prefill speed-up and FLOPs ratio vs "
          f"{ref.spec}; {load}")  # fmt: skip
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
    for line in targets(rows, base.anyres):
        print(line)
    write_json(args.json, args, rows)
    return rows


def targets(rows: list[Row], anyres: bool = False) -> list[str]:
    """Per reduced variant: LLM prefill speed-up >= 80 % of its LLM FLOPs ratio, reducer time < 5 % of the prefill.

    AnyRes (issue 14), per other projector: speed-up >= 85 % of the FLOPs ratio, projector < 5 % of the prefill.
    """
    ref, lines = rows[0], []
    for r in rows[1:]:
        speedup, ratio = ref.times["llm"] / r.times["llm"], ref.llm_flops / r.llm_flops
        if "+" in r.spec:
            part, bound, overhead = "reducer", 0.8, r.times["reducer"] / r.times["prefill"]
        elif anyres:
            part, bound, overhead = "projector", 0.85, r.times["projector"] / r.times["prefill"]
        else:
            continue
        verdict = "meets" if speedup / ratio >= bound and overhead < 0.05 else "MISSES"
        measured = f" {speedup:.2f}x of {ratio:.2f}x =" if anyres else ""
        lines.append(f"target {r.spec}: speed-up{measured} {speedup / ratio:.0%} of the FLOPs ratio (>= {bound:.0%}), "
                     f"{part} {overhead:.1%} of the prefill (< 5%): {verdict}")  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
