"""Analytic prefill FLOPs of a LLaVA-STF model on its real shapes (no weights), in two conventions.

- **paper**: the LLM only, over the visual tokens only, ``2 x sum over layers of 4nd^2 + 2n^2d + 3ndm`` (Q/K/V/O,
  the two attention products, the SwiGLU FFN). Reproduces the 7.6 / 1.9 TFLOPs of LLaVA-1.5-7B / LLaVA-STF-7B.
- **full prefill**: visual + text tokens through the LLM, plus the vision encoder, the projector and the LM head on
  the last position (what ``generate`` computes at prefill), each part shown.

FLOPs = 2 x multiply-accumulates throughout. Softmax, norms, RoPE and embedding lookups are ignored.
Run ``python -m llava_stf.bench.flops --preset llava-stf-7b --text-tokens 64``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

from ..model import LlavaStfConfig
from ..model.modeling_llava_stf import build_projector
from ..model.presets import list_presets, load_preset


def decoder_layer_macs(n: int, hidden: int, ffn: int, kv_hidden: int | None = None, ffn_mats: int = 3) -> int:
    """MACs of one decoder layer at prefill over ``n`` tokens (Q/O at full width, K/V at ``kv_hidden``)."""
    kv_hidden = hidden if kv_hidden is None else kv_hidden
    projections = 2 * n * hidden * hidden + 2 * n * hidden * kv_hidden
    attention = 2 * n * n * hidden
    return projections + attention + ffn_mats * n * hidden * ffn


def llm_macs(n: int, text_config) -> int:
    """All decoder layers of a Llama-style LLM (SwiGLU, 3 FFN matrices) over ``n`` tokens."""
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    kv_hidden = head_dim * (text_config.num_key_value_heads or text_config.num_attention_heads)
    per_layer = decoder_layer_macs(n, text_config.hidden_size, text_config.intermediate_size, kv_hidden)
    return text_config.num_hidden_layers * per_layer


def vision_macs(vision_config) -> int:
    """CLIP-style ViT over one image: patch embedding plus every block (plain 2-matrix MLP), CLS included."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    d = vision_config.hidden_size
    embed = patches * vision_config.num_channels * vision_config.patch_size**2 * d
    per_layer = decoder_layer_macs(patches + 1, d, vision_config.intermediate_size, ffn_mats=2)
    return embed + vision_config.num_hidden_layers * per_layer


def module_macs(module: nn.Module, example: torch.Tensor) -> int:
    """MACs of every Linear / Conv2d that runs when ``module(example)`` is called (shapes only, meta device ok)."""
    total = 0

    def hook(layer: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Linear):
            total += output.numel() * layer.in_features
        else:  # Conv2d: each output element is a dot product over in_channels/groups * kh * kw inputs
            kh, kw = layer.kernel_size
            total += output.numel() * (layer.in_channels // layer.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    return total


def projector_macs(config: LlavaStfConfig) -> int:
    """The projector over one image, built on the meta device from the config."""
    shapes = config.projector_shapes()
    with torch.device("meta"):
        projector = build_projector(config)
        example = torch.empty(1, shapes.grid_h * shapes.grid_w, shapes.in_channels)
    return module_macs(projector, example)


@dataclass
class FlopsReport:
    """FLOPs (2 x MACs) of one image + ``text_tokens`` at prefill."""

    image_tokens: int
    text_tokens: int
    paper: int  # LLM over the visual tokens only
    vision: int
    projector: int
    llm: int  # LLM over visual + text tokens
    lm_head: int  # last position only

    @property
    def full(self) -> int:
        return self.vision + self.projector + self.llm + self.lm_head


def count_flops(config: LlavaStfConfig, text_tokens: int = 0) -> FlopsReport:
    n_img = config.num_image_tokens
    text = config.text_config
    return FlopsReport(
        image_tokens=n_img,
        text_tokens=text_tokens,
        paper=2 * llm_macs(n_img, text),
        vision=2 * vision_macs(config.vision_config),
        projector=2 * projector_macs(config),
        llm=2 * llm_macs(n_img + text_tokens, text),
        lm_head=2 * text.hidden_size * text.vocab_size,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["llava-v1.5-7b", "llava-stf-7b"], help=str(list_presets()))
    parser.add_argument("--projector", default=None, help="replace the preset's projector (default settings)")
    parser.add_argument("--text-tokens", type=int, default=0, help="text tokens in the full-prefill convention")
    args = parser.parse_args(argv)
    rows = []
    for name in args.preset:
        config = load_preset(name)
        if args.projector:
            fields = config.to_dict()
            fields.update(projector_type=args.projector, projector_kwargs=None, vision_feature_layer=None)
            config = LlavaStfConfig(**fields)
        rows.append((name, config.projector_type, count_flops(config, args.text_tokens)))
    base = rows[0][2]
    t = 1e12
    print(f"prefill TFLOPs (2 x MACs), one 336-px image + {args.text_tokens} text tokens; ratios vs {rows[0][0]}")
    print(
        f"{'preset':22} {'projector':12} {'img tok':>7} {'paper':>7} {'ratio':>6} | {'vision':>6} {'proj':>6} "
        f"{'llm':>7} {'head':>6} {'full':>7} {'ratio':>6}"
    )
    for name, proj, r in rows:
        print(
            f"{name:22} {proj:12} {r.image_tokens:>7} {r.paper / t:>7.3f} {r.paper / base.paper:>6.3f} | "
            f"{r.vision / t:>6.3f} {r.projector / t:>6.3f} {r.llm / t:>7.3f} {r.lm_head / t:>6.4f} "
            f"{r.full / t:>7.3f} {r.full / base.full:>6.3f}"
        )


if __name__ == "__main__":
    main()
