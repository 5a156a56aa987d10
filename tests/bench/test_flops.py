"""FLOPs: the paper's 7.6 / 1.9 TFLOPs, the formula's scaling, and a cross-check against torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_stf.bench.flops import count_flops, llm_macs, projector_macs
from llava_stf.model import LlavaStfConfig
from llava_stf.model.presets import load_preset
from llava_stf.testing import make_image, tiny_config, tiny_model, tiny_processor


@pytest.mark.parametrize(
    "preset, tflops", [("llava-v1.5-7b", 7.634), ("llava-stf-7b", 1.876), ("ablation-k2-n2-7b", 3.774)]
)
def test_paper_convention_reproduces_reference(preset, tflops):
    # token-reducers.md 8.2: visual tokens only, LLM only, 2 x MACs.
    assert count_flops(load_preset(preset)).paper / 1e12 == pytest.approx(tflops, abs=5e-4)


def test_connector_and_encoder_costs_match_reference():
    stf = count_flops(load_preset("llava-stf-7b"))
    base = count_flops(load_preset("llava-v1.5-7b"))
    assert stf.projector / 1e9 == pytest.approx(82.2, abs=0.5)  # llava-stf-official.md 1.8: ~82 GFLOPs
    assert base.projector / 1e9 == pytest.approx(24.2, abs=0.5)  # ~24 GFLOPs for mlp2x on 576 tokens
    assert stf.vision == base.vision and stf.vision / 1e12 == pytest.approx(0.38, abs=0.01)


def test_llm_count_is_the_layer_polynomial():
    text = load_preset("llava-v1.5-7b").text_config
    d, m, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    for n in (1, 144, 576, 1000):
        assert llm_macs(n, text) == layers * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m)
    # Text tokens add to n; the relative saving of STF shrinks with a real prompt (8.3: 24.6% -> 32.0% at 64).
    ratio_0 = count_flops(load_preset("llava-stf-7b")).llm / count_flops(load_preset("llava-v1.5-7b")).llm
    ratio_64 = count_flops(load_preset("llava-stf-7b"), 64).llm / count_flops(load_preset("llava-v1.5-7b"), 64).llm
    assert ratio_0 == pytest.approx(0.246, abs=1e-3) and ratio_64 == pytest.approx(0.320, abs=1e-3)


def test_image_size_scales_token_count():
    config = load_preset("llava-stf-7b").to_dict()
    config["vision_config"]["image_size"] = 672  # 48 x 48 patches -> 24 x 24 windows
    big = LlavaStfConfig(**config)
    report = count_flops(big)
    assert report.image_tokens == 576
    assert report.paper == count_flops(load_preset("llava-v1.5-7b")).paper
    assert report.projector == 4 * count_flops(load_preset("llava-stf-7b")).projector


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "mbtf_stf", "token_concat"])
def test_full_prefill_matches_flop_counter_mode(projector):
    config = tiny_config(projector_type=projector)
    model = tiny_model(config)
    model.set_attn_implementation("eager")  # FlopCounterMode sees the attention matmuls only in eager mode
    inputs = tiny_processor(config)(images=[make_image(0)], text=["USER: <image>\nWhat is in the picture? ASSISTANT:"])
    n_text = inputs["input_ids"].shape[1] - config.num_image_tokens
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs, logits_to_keep=1)
    assert counter.get_total_flops() == count_flops(config, n_text).full


def test_projector_count_matches_flop_counter_mode():
    config = tiny_config(projector_type="mbtf_stf", projector_kwargs={"fused_tokens": 2, "num_align_layers": 2})
    projector = tiny_model(config).model.multi_modal_projector
    shapes = config.projector_shapes()
    x = torch.randn(1, shapes.grid_h * shapes.grid_w, shapes.in_channels)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        projector(x)
    assert counter.get_total_flops() == 2 * projector_macs(config)
