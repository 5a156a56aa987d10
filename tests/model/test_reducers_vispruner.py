"""VisPruner: the important / diverse split, the de-duplication rounds against a per-image loop, constructed
duplicates, batching, SDPA / eager, budgets (48 + 16 at 64 tokens), config errors, FLOPs and generation."""

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
from llava_stf.model.reducers import ReducerConfigError, VisPruner, VisPrunerParams, budget_kwargs
from llava_stf.model.reducers.vispruner import matching_rounds, split_counts
from llava_stf.testing import make_image, tiny_config, tiny_model, tiny_processor

SHAPES_7B = load_preset("llava-v1.5-7b").reducer_shapes()


def reference_cls_score(h: torch.Tensor, block) -> np.ndarray:
    """``[N]`` CLS->patch attention of one image ``h [N + 1, C]``, averaged over heads (one head at a time)."""
    with torch.no_grad():
        x = block.layer_norm1(h).double()
        attn = block.self_attn
        q = x[0] @ attn.q_proj.weight.double().T + attn.q_proj.bias.double()
        k = x @ attn.k_proj.weight.double().T + attn.k_proj.bias.double()
    heads, d = attn.num_heads, h.shape[-1] // attn.num_heads
    total = np.zeros(len(h) - 1)
    for i in range(heads):
        logits = (k[:, i * d : (i + 1) * d] @ q[i * d : (i + 1) * d]).numpy() / math.sqrt(d)
        p = np.exp(logits - logits.max())
        total += (p / p.sum())[1:]
    return total / heads


def reference_select(score: np.ndarray, x: torch.Tensor, tokens: int, ratio: float, per_round: int = 8) -> list[int]:
    """The published procedure for one image, one list operation at a time (float64 cosine similarity)."""
    important = int(tokens * ratio)
    diverse = tokens - important
    order = [int(i) for i in np.argsort(-score, kind="stable")]
    kept, residual = order[:important], order[important:]
    unit = x.double() / x.double().norm(dim=-1, keepdim=True)
    while diverse > 0:
        r = min(per_round, len(residual) - diverse, (len(residual) + 1) // 2)
        if r <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        best = np.array([max(float(unit[i] @ unit[j]) for j in b) for i in a])
        residual = [a[i] for i in np.argsort(-best, kind="stable")[r:]] + b
    return sorted(kept + residual) if diverse > 0 else sorted(kept)


def tower_inputs(model, pixel_values):
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    features = torch.cat([hidden[i][:, 1:] for i in model.config.vision_layers], dim=-1)
    index = model.model.reducer.block_index(len(hidden) - 1)
    return features, hidden[index], model.model.vision_tower.encoder.layers[index]


@pytest.fixture(scope="module")
def model():
    kwargs = {"tokens": 20, "important_ratio": 0.5}
    return tiny_model(tiny_config(projector_type="mbtf", reducer_type="vispruner", reducer_kwargs=kwargs))


def test_published_split_and_rounds():
    assert split_counts(VisPrunerParams(tokens=64, important_ratio=0.75)) == (48, 16)  # README example
    assert split_counts(VisPrunerParams(tokens=128, important_ratio=0.5)) == (64, 64)
    assert split_counts(VisPrunerParams(tokens=20, important_ratio=0.55)) == (11, 9)  # floor, as int(T * r)
    rounds = matching_rounds(576 - 48, 16, 8)  # 528 residual tokens -> 16, eight at a time
    assert len(rounds) == 64 and rounds[0] == (528, 8) and rounds[-1] == (24, 8)
    assert matching_rounds(54, 10, 8)[-1] == (14, 4)  # the last round drops only what is left to drop
    assert matching_rounds(5, 1, 8) == [(5, 3), (2, 1)]  # at most ceil(R / 2) per round
    assert matching_rounds(40, 0, 8) == []


@pytest.mark.parametrize(("duplicate_of_5", "kept"), [(7, [0, 1, 3, 5]), (3, [0, 1, 5, 7])])
def test_the_duplicate_is_dropped(duplicate_of_5, kept):
    # score descending in patch order: important = [0, 1]; residual [2..7], diverse 2. Round 1 (R = 6, r = 3) drops
    # every a = [2, 4, 6]; round 2 (R = 3, r = 1): a = [3, 7], b = [5]; the a equal to 5 goes.
    reducer = VisPruner(VisPrunerParams(tokens=4, important_ratio=0.5), SHAPES_7B)
    features = torch.randn(1, 8, 6)
    features[0, duplicate_of_5] = features[0, 5]
    score = -torch.arange(8.0)[None]
    assert reducer.select(score, features).tolist() == [kept]
    assert reference_select(score[0].numpy(), features[0], 4, 0.5) == kept


@pytest.mark.parametrize("ratio", [0.5, 0.55, 0.0, 1.0])  # 0.55: an odd residual list (11 important)
def test_selection_equals_a_per_image_reference(model, ratio):
    features, h, block = tower_inputs(model, torch.randn(3, 3, 32, 32))
    reducer = VisPruner(VisPrunerParams(tokens=20, important_ratio=ratio), model.model.reducer.shapes)
    with torch.no_grad():
        tokens, valid = reducer(features, h, block)
    assert tokens.shape == (3, 20, features.shape[-1]) and valid.all()
    for b in range(3):
        expected = reference_select(reference_cls_score(h[b], block), features[b], 20, ratio)
        torch.testing.assert_close(tokens[b], features[b, expected], rtol=0, atol=0)
        alone, _ = reducer(features[b : b + 1], h[b : b + 1], block)
        torch.testing.assert_close(alone[0], tokens[b], rtol=0, atol=0)


def test_model_features_sdpa_equal_eager_and_batch_equals_alone(model):
    pixel_values = torch.randn(2, 3, 32, 32)
    outputs = {}
    for attn in ("sdpa", "eager"):
        model.set_attn_implementation(attn)
        with torch.no_grad():
            outputs[attn] = model.model.get_image_features(pixel_values=pixel_values).pooler_output
    for b in range(2):
        torch.testing.assert_close(outputs["sdpa"][b], outputs["eager"][b], rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            alone = model.model.get_image_features(pixel_values=pixel_values[b : b + 1]).pooler_output[0]
        torch.testing.assert_close(alone, outputs["eager"][b], rtol=1e-5, atol=1e-6)
        assert alone.shape == (20, model.config.text_config.hidden_size)


@pytest.mark.parametrize(("tokens", "ratio"), [(64, 0.75), (128, 0.5), (192, 0.5)])
def test_budgets_give_exactly_the_count(tokens, ratio):
    kwargs = budget_kwargs("vispruner", tokens, SHAPES_7B)
    assert kwargs == {"tokens": tokens, "important_ratio": ratio, "duplicates_per_round": 8, "attn_layer": -3}
    config = tiny_config(projector_type="mlp2x_gelu", vision_overrides={"image_size": 64})  # 16 x 16 = 256 patches
    config = config.with_reducer("vispruner", budget_kwargs("vispruner", tokens, config.reducer_shapes()))
    assert config.num_image_tokens == tokens
    with torch.no_grad():
        out = tiny_model(config).model.get_image_features(pixel_values=torch.randn(2, 3, 64, 64)).pooler_output
    assert [len(o) for o in out] == [tokens, tokens]


@pytest.mark.parametrize(
    ("kwargs", "config_kwargs", "message"),
    [
        ({"tokens": 0}, {}, r"reducer_kwargs\.tokens must be an integer >= 1, got 0"),
        ({"tokens": 600}, {}, r"reducer_kwargs\.tokens=600 exceeds the 576 patches"),
        ({"important_ratio": 1.5}, {}, r"reducer_kwargs\.important_ratio must be a number in \[0, 1\]"),
        ({"duplicates_per_round": 0}, {}, r"reducer_kwargs\.duplicates_per_round must be an integer >= 1"),
        ({"attn_layer": 24}, {}, r"reducer_kwargs\.attn_layer=24 names no hidden state"),
        ({"ratio": 0.5}, {}, r"unknown field\(s\) \['ratio'\]"),
        ({}, {"projector_type": "stf"}, r"reducer_type 'vispruner'.*projector_type 'stf'"),
    ],
)
def test_bad_settings_name_the_field(kwargs, config_kwargs, message):
    vision = load_preset("llava-v1.5-7b").vision_config.to_dict()  # CLIP ViT-L/14 at 336 px: 576 patches
    with pytest.raises(ReducerConfigError, match=message):
        LlavaStfConfig(vision_config=vision, reducer_type="vispruner", reducer_kwargs=kwargs, **config_kwargs)


def test_flops_match_flop_counter_mode(model):
    config = model.config
    features, h, block = tower_inputs(model, torch.randn(1, 3, 32, 32))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.model.reducer(features, h, block)
    scoring = count_flops(config.with_reducer("vispruner", {"tokens": 20, "important_ratio": 1.0})).reducer
    assert counter.get_total_flops() == count_flops(config).reducer > scoring  # the rounds are counted too
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
    assert int((inputs["input_ids"][0] == model.config.image_token_id).sum()) == 20
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
