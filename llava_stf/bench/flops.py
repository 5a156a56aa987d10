"""``python -m llava_stf.bench.flops``: the analytic prefill FLOPs (``llava_stf.flops``) of presets side by side.

Ratios are against the first ``--preset`` as published; ``--projector`` / ``--reducer`` put the first preset as
published on top and change the others; ``--tokens N`` sets the reducer's settings for a budget of N image tokens (its
own rule). PruMerge's token count is adaptive, so it is assumed (``--reducer-tokens``, default: the published
average). ``--image-size H W`` is the image counted: AnyRes (LLaVA-NeXT) presets tile it into crops (default
672x672); LLaVA-1.5 presets resize any image to one 336-px crop. With an AnyRes preset a token table follows
(crops and image tokens, newlines included, at a few sizes). Run
``python -m llava_stf.bench.flops --preset llava-v1.5-7b --reducer visionzip --tokens 64 --text-tokens 64`` or
``python -m llava_stf.bench.flops --preset llava-v1.6-vicuna-7b llava-stf-next-7b --text-tokens 40``.
"""

from __future__ import annotations

import argparse
import json

from ..flops import count_flops, image_geometry
from ..model import LlavaStfConfig
from ..model.presets import list_presets, load_preset
from ..model.reducers import REDUCERS, budget_kwargs

TABLE_SIZES = [(672, 672), (336, 1008), (336, 672), (375, 500), (500, 375)]  # (height, width); 375x500: a photo


def token_table(rows: list[tuple[str, LlavaStfConfig]]) -> list[str]:
    """Crops and image tokens per preset at :data:`TABLE_SIZES`, and the first preset's count over each other's."""
    rows = list(dict(rows).items())  # one column per preset name
    head = f"{'height x width':>14}" + "".join(f" {'crops':>5} {name[:22]:>22}" for name, _ in rows)
    head += "".join(f" {'ratio':>6}" for _ in rows[1:])
    lines = ["image tokens per image (AnyRes: base crop + unpadded tiles + newlines; 1.5: resized to one crop)", head]
    for height, width in TABLE_SIZES:
        counts = [image_geometry(config, height, width) for _, config in rows]
        cells = "".join(f" {crops:>5} {tokens:>22,}" for crops, tokens in counts)
        ratios = "".join(f" {counts[0][1] / tokens:>5.2f}x" for _, tokens in counts[1:])
        lines.append(f"{f'{height} x {width}':>14}{cells}{ratios}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["llava-v1.5-7b", "llava-stf-7b"], help=str(list_presets()))
    parser.add_argument("--projector", default=None, help="replace the preset's projector (default settings)")
    parser.add_argument("--reducer", default=None, choices=sorted(REDUCERS), help="add a token reducer")
    parser.add_argument("--tokens", type=int, default=None, help="the reducer's token budget (its own mapping)")
    parser.add_argument("--reducer-kwargs", type=json.loads, default=None, help='e.g. \'{"k": 3, "r": 0.75}\'')
    parser.add_argument("--reducer-tokens", type=int, default=None, help="PruMerge tokens kept per image (assumed)")
    parser.add_argument("--text-tokens", type=int, default=0, help="text tokens in the full-prefill convention")
    size_help = "the image in pixels (AnyRes presets: default 672 672; 1.5 presets resize it to 336)"
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"), help=size_help)
    args = parser.parse_args(argv)
    rows = [(args.preset[0], load_preset(args.preset[0]))] if args.projector or args.reducer else []
    for name in args.preset:  # ratios are against the first preset as published
        published = load_preset(name)
        fields = published.to_dict()
        if args.projector:
            fields.update(projector_type=args.projector, projector_kwargs=None, vision_feature_layer=None)
        fields.update(reducer_type=None, reducer_kwargs=None)
        config = type(published)(**fields)
        kwargs = args.reducer_kwargs
        if args.reducer and args.tokens is not None:
            kwargs = budget_kwargs(args.reducer, args.tokens, config.with_reducer(args.reducer).reducer_shapes())
        rows.append((name, config.with_reducer(args.reducer, kwargs) if args.reducer else config))
    size = tuple(args.image_size) if args.image_size else None
    reports = [count_flops(c, args.text_tokens, args.reducer_tokens, size) for _, c in rows]
    base, t = reports[0], 1e12
    counted = next((r for (_, c), r in zip(rows, reports) if c.anyres), reports[0])  # AnyRes: the size tiled
    resized = " (LLaVA-1.5 presets: resized to one crop)" if not all(c.anyres for _, c in rows) else ""
    print(f"prefill TFLOPs (2 x MACs), one {counted.image_size[0]}x{counted.image_size[1]} px image{resized} + "
          f"{args.text_tokens} text tokens; ratios vs {rows[0][0]}; KV-MB: the image's tokens, bf16")  # fmt: skip
    w = max(15, *(len(name) for name, _ in rows))
    print(
        f"{'preset':{w}} {'projector':10} {'reducer':13} {'img tok':>7} {'eq tok':>6} {'paper':>6} {'ratio':>5} | "
        f"{'vision':>6} {'proj':>5} {'reduce':>6} {'llm':>6} {'ratio':>5} {'head':>6} {'full':>6} {'ratio':>5} | "
        f"{'crops':>5} {'KV-MB':>7}"
    )
    for (name, config), r in zip(rows, reports):
        print(
            f"{name:{w}} {config.projector_type:10} {config.reducer_type or '-':13} {r.image_tokens:>7} "
            f"{r.equivalent_tokens:>6.0f} {r.paper / t:>6.3f} {r.paper / base.paper:>5.3f} | {r.vision / t:>6.3f} "
            f"{r.projector / t:>5.3f} {r.reducer / t:>6.4f} {r.llm / t:>6.3f} {r.llm / base.llm:>5.3f} "
            f"{r.lm_head / t:>6.4f} {r.full / t:>6.3f} {r.full / base.full:>5.3f} | {r.crops:>5} "
            f"{r.image_kv_bytes / 2**20:>7.1f}"
        )
    if args.reducer in ("prumerge", "prumerge_plus"):
        print(f"note: {args.reducer} keeps an adaptive count per image; assumed {reports[-1].image_tokens} LLM tokens")
    if any(config.anyres for _, config in rows):
        print()
        print("\n".join(token_table(rows)))


if __name__ == "__main__":
    main()
