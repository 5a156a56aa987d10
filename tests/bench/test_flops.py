"""FLOPs: the paper's 7.6 / 1.9 TFLOPs, the formula's scaling, and a cross-check against torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_stf.flops import count_flops, llm_macs, projector_macs
from llava_stf.model import LlavaStfConfig
from llava_stf.model.presets import load_preset
from llava_stf.testing import make_image, tiny_config, tiny_model, tiny_processor


@pytest.mark.parametrize(
    "preset, tflops", [("llava-v1.5-7b", 7.634), ("llava-stf-7b", 1.876), ("ablation-k2-n2-7b", 3.774)]
)
def test_paper_convention_reproduces_reference(preset, tflops):
    # The paper's convention (its 7.6 / 1.9 TFLOPs): visual tokens only, LLM only, 2 x MACs.
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


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "mbtf_stf", "token_concat", "tokenpacker"])
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


# ------------------------------------------------------------------------------------------------- token reducers
def with_reducer(preset: str, reducer: str, **kwargs) -> LlavaStfConfig:
    return load_preset(preset).with_reducer(reducer, kwargs or None)


def test_fastv_follows_its_paper_formula():
    # FastV's own formula (arXiv 2403.06764):
    # K f(n) + (L - K) f(n - R 576), n including the text; FLOPs = 57% (7B, K=3, R=0.5,
    # about 40 non-image tokens) and about 55% (13B, K=2, R=0.5).
    for preset, k, expected in [("llava-v1.5-7b", 3, 0.57), ("llava-v1.5-13b", 2, 0.55)]:
        base = count_flops(load_preset(preset), 40)
        fastv = count_flops(with_reducer(preset, "fastv", k=k, r=0.5), 40)
        assert fastv.llm / base.llm == pytest.approx(expected, abs=0.005)
        text = load_preset(preset).text_config
        layers = text.num_hidden_layers
        assert fastv.llm == 2 * (k * llm_macs(616, text, 1) + (layers - k) * llm_macs(328, text, 1))
        assert fastv.paper == 2 * (k * llm_macs(576, text, 1) + (layers - k) * llm_macs(288, text, 1))


def test_fastv_equivalent_tokens_and_text_scaling():
    report = count_flops(with_reducer("llava-v1.5-7b", "fastv", k=2, r=0.75))
    assert report.equivalent_tokens == 171  # (2 * 576 + 30 * 144) / 32, as in SparseVLM-style tables
    text = load_preset("llava-v1.5-7b").text_config
    for n_text in (0, 35, 64):
        report = count_flops(with_reducer("llava-v1.5-7b", "fastv", k=2, r=0.5), n_text)
        assert report.llm == 2 * (2 * llm_macs(576 + n_text, text, 1) + 30 * llm_macs(288 + n_text, text, 1))
        assert report.reducer == 2 * ((576 + n_text) * 4096 * 4096 + 4096 * 4096 + (576 + n_text) * 4096)
    noop = count_flops(with_reducer("llava-v1.5-7b", "fastv", k=32, r=0.5), 40)
    assert noop.llm == count_flops(load_preset("llava-v1.5-7b"), 40).llm and noop.reducer == 0


def test_prumerge_uses_an_assumed_count():
    base = count_flops(load_preset("llava-v1.5-7b"))
    assumed = count_flops(with_reducer("llava-v1.5-7b", "prumerge"))
    assert assumed.image_tokens == 33  # published average of 32 kept tokens, plus the extra one
    assert count_flops(with_reducer("llava-v1.5-7b", "prumerge_plus")).image_tokens == 145
    chosen = count_flops(with_reducer("llava-v1.5-7b", "prumerge"), reducer_tokens=63)
    text = load_preset("llava-v1.5-7b").text_config
    assert chosen.image_tokens == 64 and chosen.paper == 2 * llm_macs(64, text)
    assert chosen.projector == 2 * 64 * (1024 * 4096 + 4096 * 4096)  # the projector runs on the kept rows only
    assert chosen.vision == base.vision  # a pre-LLM reducer never saves the encoder
    assert 0 < assumed.reducer < chosen.reducer < 0.01 * base.vision


@pytest.mark.parametrize(
    ("projector", "reducer", "kwargs"),
    [
        ("mlp2x_gelu", "fastv", {"k": 1, "r": 0.5}),
        ("mbtf_stf", "fastv", {"k": 1, "r": 0.75}),
        ("mlp2x_gelu", "prumerge", {}),
        ("mbtf", "prumerge_plus", {}),
    ],
)
def test_reducer_counts_match_flop_counter_mode(projector, reducer, kwargs):
    config = tiny_config(projector_type=projector, reducer_type=reducer, reducer_kwargs=kwargs)
    model = tiny_model(config)
    model.set_attn_implementation("eager")
    processor, prompt = tiny_processor(config), ["USER: <image>\nWhat is in the picture? ASSISTANT:"]
    inputs = processor(images=[make_image(0)], text=prompt)
    n_text = inputs["input_ids"].shape[1] - config.num_image_tokens
    selected = None
    if reducer != "fastv":  # PruMerge: the prompt holds the image's own count (selected + the extra token)
        with torch.no_grad():
            selected = len(model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]) - 1
        inputs = processor(images=[make_image(0)], text=prompt, image_tokens=[selected + 1])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs, logits_to_keep=1)
    assert counter.get_total_flops() == count_flops(config, n_text, reducer_tokens=selected).full


def test_report_takes_any_reducer_at_a_budget(capsys):
    from llava_stf.bench.flops import main

    main(["--preset", "llava-v1.5-7b", "--reducer", "pyramiddrop", "--tokens", "64", "--text-tokens", "64"])
    last = capsys.readouterr().out.splitlines()[-1].split()
    assert last[2] == "pyramiddrop" and last[3:5] == ["576", "64"]  # 576 enter the LLM, 64 on layer average
