"""``python -m llava_stf.bench.flops``: the analytic prefill FLOPs (``llava_stf.flops``) of presets side by side.

Ratios are against the first ``--preset`` as published; ``--projector`` / ``--reducer`` put the first preset as
published on top and change the others; ``--tokens N`` sets the reducer's settings for a budget of N image tokens (its
own rule). PruMerge's token count is adaptive, so it is assumed (``--reducer-tokens``, default: the published
average). Run
``python -m llava_stf.bench.flops --preset llava-v1.5-7b --reducer visionzip --tokens 64 --text-tokens 64``.
"""

from __future__ import annotations

import argparse
import json

from ..flops import count_flops
from ..model import LlavaStfConfig
from ..model.presets import list_presets, load_preset
from ..model.reducers import REDUCERS, budget_kwargs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["llava-v1.5-7b", "llava-stf-7b"], help=str(list_presets()))
    parser.add_argument("--projector", default=None, help="replace the preset's projector (default settings)")
    parser.add_argument("--reducer", default=None, choices=sorted(REDUCERS), help="add a token reducer")
    parser.add_argument("--tokens", type=int, default=None, help="the reducer's token budget (its own mapping)")
    parser.add_argument("--reducer-kwargs", type=json.loads, default=None, help='e.g. \'{"k": 3, "r": 0.75}\'')
    parser.add_argument("--reducer-tokens", type=int, default=None, help="PruMerge tokens kept per image (assumed)")
    parser.add_argument("--text-tokens", type=int, default=0, help="text tokens in the full-prefill convention")
    args = parser.parse_args(argv)
    rows = [(args.preset[0], load_preset(args.preset[0]))] if args.projector or args.reducer else []
    for name in args.preset:  # ratios are against the first preset as published
        fields = load_preset(name).to_dict()
        if args.projector:
            fields.update(projector_type=args.projector, projector_kwargs=None, vision_feature_layer=None)
        fields.update(reducer_type=None, reducer_kwargs=None)
        config = LlavaStfConfig(**fields)
        kwargs = args.reducer_kwargs
        if args.reducer and args.tokens is not None:
            kwargs = budget_kwargs(args.reducer, args.tokens, config.with_reducer(args.reducer).reducer_shapes())
        rows.append((name, config.with_reducer(args.reducer, kwargs) if args.reducer else config))
    reports = [count_flops(c, args.text_tokens, args.reducer_tokens) for _, c in rows]
    base, t = reports[0], 1e12
    print(f"prefill TFLOPs (2 x MACs), one image + {args.text_tokens} text tokens; ratios vs {rows[0][0]}")
    print(
        f"{'preset':15} {'projector':10} {'reducer':13} {'img tok':>7} {'eq tok':>6} {'paper':>6} {'ratio':>5} | "
        f"{'vision':>6} {'proj':>5} {'reduce':>6} {'llm':>6} {'ratio':>5} {'head':>6} {'full':>6} {'ratio':>5}"
    )
    for (name, config), r in zip(rows, reports):
        print(
            f"{name:15} {config.projector_type:10} {config.reducer_type or '-':13} {r.image_tokens:>7} "
            f"{r.equivalent_tokens:>6.0f} {r.paper / t:>6.3f} {r.paper / base.paper:>5.3f} | {r.vision / t:>6.3f} "
            f"{r.projector / t:>5.3f} {r.reducer / t:>6.4f} {r.llm / t:>6.3f} {r.llm / base.llm:>5.3f} "
            f"{r.lm_head / t:>6.4f} {r.full / t:>6.3f} {r.full / base.full:>5.3f}"
        )
    if args.reducer in ("prumerge", "prumerge_plus"):
        print(f"note: {args.reducer} keeps an adaptive count per image; assumed {reports[-1].image_tokens} LLM tokens")


if __name__ == "__main__":
    main()
