"""VisionZip: dominant tokens (CLS + top head-summed CLS attention) and contextual merging against a per-image loop,
the CLS feature of the feature layers, batching, SDPA / eager, budgets (54 + 10, 108 + 20, 162 + 30), config errors,
FLOPs and generation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_stf.flops import count_flops
from llava_stf.generation import GenerationSettings, Generator, Request
from llava_stf.model import LlavaStfConfig
from llava_stf.model.presets import load_preset
from llava_stf.model.reducers import ReducerConfigError, VisionZip, VisionZipParams, budget_kwargs
from llava_stf.testing import make_image, tiny_config, tiny_model, tiny_processor

SHAPES_7B = load_preset("llava-v1.5-7b").reducer_shapes()


def reference_visionzip(x, cls_x, h, block, dominant: int, contextual: int) -> torch.Tensor:
    """One image, the published procedure with loops (float64 scores and metric).

    Args: ``x [N, C_in]`` patch features, ``cls_x [C_in]`` CLS feature, ``h [N + 1, C]`` the block's input.
    """
    with torch.no_grad():
        ln = block.layer_norm1(h).double()
        attn = block.self_attn
        q = ln[0] @ attn.q_proj.weight.double().T + attn.q_proj.bias.double()
        k = ln @ attn.k_proj.weight.double().T + attn.k_proj.bias.double()
    heads, d, n = attn.num_heads, h.shape[-1] // attn.num_heads, len(h) - 1
    score, metric = np.zeros(n), torch.zeros(n, d, dtype=torch.float64)
    for i in range(heads):
        cols = slice(i * d, (i + 1) * d)
        logits = np.array([float(q[cols] @ k[j, cols]) for j in range(n + 1)]) / math.sqrt(d)
        p = np.exp(logits - logits.max())
        score += (p / p.sum())[1:]
        metric += k[1:, cols] / heads
    metric = metric / metric.norm(dim=-1, keepdim=True)
    top = sorted(int(i) for i in np.argsort(-score, kind="stable")[: dominant - 1])
    rest = [p for p in range(n) if p not in top]
    rows = [cls_x] + [x[p] for p in top]
    if contextual:
        step = max(1, len(rest) // contextual)
        targets = list(range(0, len(rest), step))[:contextual]
        groups = {t: [] for t in targets}
        for pos, p in enumerate(rest):
            if pos not in targets:
                sims = [float(metric[p] @ metric[rest[t]]) for t in targets]
                groups[targets[int(np.argmax(sims))]].append(p)
        for t in targets:
            merged = torch.stack([x[p] for p in groups[t]]).mean(0) if groups[t] else torch.zeros_like(x[0])
            rows.append(x[rest[t]] + merged)
    return torch.stack(rows)


def tower_inputs(model, pixel_values):
    """``(features, cls_features, attn_input, block)`` as ``get_image_features`` passes them."""
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    layers = [hidden[i] for i in model.config.vision_layers]
    index = model.model.reducer.block_index(len(hidden) - 1)
    features, cls_features = torch.cat([x[:, 1:] for x in layers], -1), torch.cat([x[:, 0] for x in layers], -1)
    return features, cls_features, hidden[index], model.model.vision_tower.encoder.layers[index]


@pytest.fixture(scope="module")
def model():
    kwargs = {"dominant": 10, "contextual": 6}
    config = tiny_config(projector_type="mbtf", reducer_type="visionzip", reducer_kwargs=kwargs)
    return tiny_model(config)  # mbtf: the features (and the CLS feature) concatenate 8 layers


@pytest.mark.parametrize(("dominant", "contextual"), [(10, 6), (1, 5), (30, 0), (40, 25)])  # 40 + 25: R = c
def test_tokens_equal_a_per_image_reference(model, dominant, contextual):
    features, cls_features, h, block = tower_inputs(model, torch.randn(3, 3, 32, 32))
    reducer = VisionZip(VisionZipParams(dominant=dominant, contextual=contextual), model.model.reducer.shapes)
    with torch.no_grad():
        tokens, valid = reducer(features, h, block, cls_features=cls_features)
    assert tokens.shape == (3, dominant + contextual, features.shape[-1]) and valid.all()
    for b in range(3):
        expected = reference_visionzip(features[b], cls_features[b], h[b], block, dominant, contextual)
        torch.testing.assert_close(tokens[b], expected, rtol=1e-5, atol=1e-6)
        alone, _ = reducer(features[b : b + 1], h[b : b + 1], block, cls_features=cls_features[b : b + 1])
        torch.testing.assert_close(alone[0], tokens[b], rtol=0, atol=0)


def test_contextual_tokens_merge_into_the_nearest_target():
    """Constructed keys: targets are patches 0 and 2 (list positions 0, 2); 1 and 5 point like 0, 4 like 2."""
    reducer = VisionZip(VisionZipParams(dominant=2, contextual=2), SHAPES_7B)
    features = torch.arange(6.0)[None, :, None] * torch.tensor([1.0, 10.0])  # patch p -> [p, 10 p]
    metric = torch.tensor([[1.0, 0], [0.9, 0.1], [0.1, 0.9], [0.2, 0.8], [0, 1], [1, 0]])[None]
    remaining = torch.tensor([[0, 1, 2, 4, 5]])  # patch 3 dominant; R = 5, step 2, targets at positions 0, 2
    merged = reducer.contextual_tokens(features, metric, remaining)
    # target 0 (patch 0) takes patches 1 and 5; target 2 (patch 2) takes patch 4
    torch.testing.assert_close(merged, torch.tensor([[[0 + 3.0, 0 + 30.0], [2 + 4.0, 20 + 40.0]]]))


def test_model_features_hold_the_projected_cls_then_dominant_then_contextual(model):
    pixel_values = torch.randn(2, 3, 32, 32)
    outputs = {}
    for attn in ("sdpa", "eager"):
        model.set_attn_implementation(attn)
        with torch.no_grad():
            outputs[attn] = model.model.get_image_features(pixel_values=pixel_values).pooler_output
    features, cls_features, h, block = tower_inputs(model, pixel_values)
    assert block is model.model.vision_tower.encoder.layers[-2]  # upstream attentions[-2]: hidden state -3 in
    for b in range(2):
        torch.testing.assert_close(outputs["sdpa"][b], outputs["eager"][b], rtol=1e-5, atol=1e-5)
        expected = reference_visionzip(features[b], cls_features[b], h[b], block, 10, 6)
        with torch.no_grad():
            projected = model.model.multi_modal_projector(expected[None].float())[0]
            alone = model.model.get_image_features(pixel_values=pixel_values[b : b + 1]).pooler_output[0]
        torch.testing.assert_close(outputs["eager"][b], projected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(alone, outputs["eager"][b], rtol=1e-5, atol=1e-6)


def test_cls_features_are_required(model):
    features, cls_features, h, block = tower_inputs(model, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"needs cls_features \[1, 256\].*got None"):
        model.model.reducer(features, h, block)
    with pytest.raises(ValueError, match="VisionZip needs the CLS token"):
        model.model.reducer(features, h[:, 1:], block, cls_features=cls_features)


@pytest.mark.parametrize(("tokens", "split"), [(64, (54, 10)), (128, (108, 20)), (192, (162, 30)), (32, (27, 5))])
def test_budgets_give_exactly_the_count(tokens, split):
    kwargs = budget_kwargs("visionzip", tokens, SHAPES_7B)
    assert kwargs == {"dominant": split[0], "contextual": split[1], "attn_layer": -3}
    config = tiny_config(projector_type="mlp2x_gelu", vision_overrides={"image_size": 64})  # 16 x 16 = 256 patches
    config = config.with_reducer("visionzip", budget_kwargs("visionzip", tokens, config.reducer_shapes()))
    assert config.num_image_tokens == tokens
    with torch.no_grad():
        out = tiny_model(config).model.get_image_features(pixel_values=torch.randn(2, 3, 64, 64)).pooler_output
    assert [len(o) for o in out] == [tokens, tokens]


@pytest.mark.parametrize(
    ("kwargs", "config_kwargs", "message"),
    [
        ({"dominant": 0}, {}, r"reducer_kwargs\.dominant must be an integer >= 1, got 0"),
        ({"contextual": -1}, {}, r"reducer_kwargs\.contextual must be an integer >= 0, got -1"),
        ({"dominant": 500, "contextual": 100}, {}, r"reducer_kwargs\.dominant=500 .* need 599 of the 576 patches"),
        ({"attn_layer": -26}, {}, r"reducer_kwargs\.attn_layer=-26 names no hidden state"),
        ({"tokens": 64}, {}, r"unknown field\(s\) \['tokens'\].*\['dominant', 'contextual', 'attn_layer'\]"),
        ({}, {"projector_type": "avgpool"}, r"reducer_type 'visionzip'.*projector_type 'avgpool'"),
        ({}, {"vision_feature_select_strategy": "full"}, r"vision_feature_select_strategy must be 'default'"),
    ],
)
def test_bad_settings_name_the_field(kwargs, config_kwargs, message):
    vision = load_preset("llava-v1.5-7b").vision_config.to_dict()  # CLIP ViT-L/14 at 336 px: 576 patches
    with pytest.raises(ReducerConfigError, match=message):
        LlavaStfConfig(vision_config=vision, reducer_type="visionzip", reducer_kwargs=kwargs, **config_kwargs)


def test_flops_match_flop_counter_mode(model):
    config = model.config
    features, cls_features, h, block = tower_inputs(model, torch.randn(1, 3, 32, 32))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.model.reducer(features, h, block, cls_features=cls_features)
    assert counter.get_total_flops() == count_flops(config).reducer
    model.set_attn_implementation("eager")  # FlopCounterMode sees the attention matmuls only in eager mode
    inputs = tiny_processor(config)(images=[make_image(0)], text=["USER: <image>\nWhat is it? ASSISTANT:"])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs, logits_to_keep=1)
    n_text = inputs["input_ids"].shape[1] - config.num_image_tokens
    assert counter.get_total_flops() == count_flops(config, n_text).full


def test_generates_batched_and_alone_with_and_without_cache(model, tokenizer):
    tokenizer.padding_side = "left"
    generator = Generator(model, tiny_processor(model.config, tokenizer))
    requests = [Request.single(q, make_image(i)) for i, q in enumerate(["What is shown?", "Describe the image."])]
    settings = GenerationSettings(max_new_tokens=5)
    both = generator.generate(requests, settings)
    assert both == [generator.generate([r], settings)[0] for r in requests]
    inputs = generator.encode(requests)
    assert int((inputs["input_ids"][0] == model.config.image_token_id).sum()) == 16
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp32_matches_cpu_and_bf16_keeps_the_count(model, tokenizer):
    pixel_values = torch.randn(2, 3, 32, 32)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        cpu = model.model.get_image_features(pixel_values=pixel_values).pooler_output
        model.to("cuda")
        gpu = model.model.get_image_features(pixel_values=pixel_values.cuda()).pooler_output
    try:
        for a, b in zip(cpu, gpu):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-3)
        model.to(torch.bfloat16)
        generator = Generator(model, tiny_processor(model.config, tokenizer))
        requests = [Request.single("What is shown?", make_image(i)) for i in (1, 2)]
        features = generator.encode(requests)["mm_encoder_outputs"]["image"].pooler_output
        assert [len(f) for f in features] == [model.config.num_image_tokens] * 2
        assert len(generator.generate(requests, GenerationSettings(max_new_tokens=4))) == 2
    finally:
        model.to("cpu", torch.float32)
