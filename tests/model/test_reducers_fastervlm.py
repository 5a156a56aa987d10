"""FasterVLM (and the shared multi-head CLS attention): the scores against the tower's own eager attention weights,
the selection against a per-image loop, batching, SDPA / eager, budgets, config errors, FLOPs and generation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_stf.flops import count_flops
from llava_stf.generation import GenerationSettings, Generator, Request
from llava_stf.model import LlavaStfConfig, LlavaStfForConditionalGeneration, LlavaStfProcessor
from llava_stf.model.presets import load_preset
from llava_stf.model.reducers import FasterVLM, FasterVLMParams, ReducerConfigError, budget_kwargs
from llava_stf.model.reducers.cls_attention import cls_attention_heads, head_mean_keys
from llava_stf.testing import make_image, tiny_config, tiny_model, tiny_processor

SHAPES_7B = load_preset("llava-v1.5-7b").reducer_shapes()


def reference_cls_attention(h: torch.Tensor, block) -> np.ndarray:
    """``[H, N]`` per-head CLS->patch attention of one image ``h [N + 1, C]``: one head, one key at a time (float64)."""
    with torch.no_grad():
        x = block.layer_norm1(h).double()
        attn = block.self_attn
        q = x[0] @ attn.q_proj.weight.double().T + attn.q_proj.bias.double()
        k = x @ attn.k_proj.weight.double().T + attn.k_proj.bias.double()
    heads, d = attn.num_heads, h.shape[-1] // attn.num_heads
    rows = []
    for i in range(heads):
        logits = np.array([float(q[i * d : (i + 1) * d] @ k[j, i * d : (i + 1) * d]) for j in range(len(h))])
        p = np.exp((logits - logits.max()) / math.sqrt(d))
        rows.append((p / p.sum())[1:])
    return np.stack(rows)


def reference_fastervlm(x: torch.Tensor, h: torch.Tensor, block, tokens: int) -> torch.Tensor:
    """One image: the top ``tokens`` patches by head-mean CLS attention, kept in patch order."""
    score = reference_cls_attention(h, block).mean(axis=0)
    return x[sorted(np.argsort(-score, kind="stable")[:tokens].tolist())]


def tower_inputs(model, pixel_values):
    """``(features [B, N, C_in], attn_input [B, N + 1, C], block)`` as ``get_image_features`` passes them."""
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    features = torch.cat([hidden[i][:, 1:] for i in model.config.vision_layers], dim=-1)
    index = model.model.reducer.block_index(len(hidden) - 1)
    return features, hidden[index], model.model.vision_tower.encoder.layers[index]


@pytest.fixture(scope="module")
def model():
    return tiny_model(tiny_config(projector_type="mbtf", reducer_type="fastervlm", reducer_kwargs={"tokens": 20}))


def test_scores_are_the_towers_own_attention_of_block_minus_2(model):
    """Recomputed from q/k: equal to the eager tower's ``attentions[-2]`` (upstream's ``select_layer = -2``)."""
    pixel_values = torch.randn(2, 3, 32, 32)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_hidden_states=True, output_attentions=True)
        _, h, block = tower_inputs(model, pixel_values)
        probs, keys = cls_attention_heads(h, block)
    assert block is model.model.vision_tower.encoder.layers[-2] and torch.equal(h, out.hidden_states[-3])
    torch.testing.assert_close(probs, out.attentions[-2][:, :, 0, 1:], rtol=1e-5, atol=1e-7)
    for b in range(2):
        torch.testing.assert_close(probs[b].double(), torch.from_numpy(reference_cls_attention(h[b], block)))
    heads = block.self_attn.num_heads
    k = block.self_attn.k_proj(block.layer_norm1(h))[:, 1:].view(2, 64, heads, -1)
    torch.testing.assert_close(head_mean_keys(keys), k.mean(dim=2))


def test_selection_equals_a_per_image_reference_and_keeps_raster_order(model):
    features, h, block = tower_inputs(model, torch.randn(3, 3, 32, 32))
    with torch.no_grad():
        tokens, valid = model.model.reducer(features, h, block)
    assert tokens.shape == (3, 20, features.shape[-1]) and valid.all()
    for b in range(3):
        torch.testing.assert_close(tokens[b], reference_fastervlm(features[b], h[b], block, 20), rtol=0, atol=0)
        alone, _ = model.model.reducer(features[b : b + 1], h[b : b + 1], block)
        torch.testing.assert_close(alone[0], tokens[b], rtol=0, atol=0)


def test_ties_go_to_the_lower_patch_index():
    reducer = FasterVLM(FasterVLMParams(tokens=3), SHAPES_7B)
    score = torch.tensor([[0.1, 0.3, 0.3, 0.2, 0.3, 0.3]])
    assert reducer.select(score).tolist() == [[1, 2, 4]]


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


@pytest.mark.parametrize("tokens", [64, 128, 192])
def test_budgets_give_exactly_the_count(tokens):
    assert budget_kwargs("fastervlm", tokens, SHAPES_7B) == {"tokens": tokens, "attn_layer": -3}
    config = tiny_config(projector_type="mlp2x_gelu", vision_overrides={"image_size": 64})  # 16 x 16 = 256 patches
    config = config.with_reducer("fastervlm", budget_kwargs("fastervlm", tokens, config.reducer_shapes()))
    assert config.num_image_tokens == tokens
    with torch.no_grad():
        out = tiny_model(config).model.get_image_features(pixel_values=torch.randn(2, 3, 64, 64)).pooler_output
    assert [len(o) for o in out] == [tokens, tokens]


@pytest.mark.parametrize(
    ("kwargs", "config_kwargs", "message"),
    [
        ({"tokens": 0}, {}, r"reducer_kwargs\.tokens must be an integer >= 1, got 0"),
        ({"tokens": 577}, {}, r"reducer_kwargs\.tokens=577 exceeds the 576 patches"),
        ({"attn_layer": -1}, {}, r"reducer_kwargs\.attn_layer=-1 names no hidden state"),
        ({"k": 3}, {}, r"unknown field\(s\) \['k'\].*valid fields: \['tokens', 'attn_layer'\]"),
        ({}, {"projector_type": "mbtf_stf"}, r"reducer_type 'fastervlm'.*projector_type 'mbtf_stf'"),
        ({}, {"vision_feature_select_strategy": "full"}, r"vision_feature_select_strategy must be 'default'"),
    ],
)
def test_bad_settings_name_the_field(kwargs, config_kwargs, message):
    vision = load_preset("llava-v1.5-7b").vision_config.to_dict()  # CLIP ViT-L/14 at 336 px: 576 patches
    with pytest.raises(ReducerConfigError, match=message):
        LlavaStfConfig(vision_config=vision, reducer_type="fastervlm", reducer_kwargs=kwargs, **config_kwargs)
    with pytest.raises(ReducerConfigError, match=r"token budget 577 for reducer_type 'fastervlm'"):
        budget_kwargs("fastervlm", 577, SHAPES_7B)


def test_flops_match_flop_counter_mode(model):
    config = model.config
    features, h, block = tower_inputs(model, torch.randn(1, 3, 32, 32))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.model.reducer(features, h, block)
    assert counter.get_total_flops() == count_flops(config).reducer > 0
    model.set_attn_implementation("eager")  # FlopCounterMode sees the attention matmuls only in eager mode
    inputs = tiny_processor(config)(images=[make_image(0)], text=["USER: <image>\nWhat is it? ASSISTANT:"])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs, logits_to_keep=1)
    n_text = inputs["input_ids"].shape[1] - config.num_image_tokens
    assert counter.get_total_flops() == count_flops(config, n_text).full


def test_a_trained_checkpoint_generates_with_fastervlm(tmp_path, tokenizer):
    """Switched on for a checkpoint trained without it; the prompt holds the reducer's fixed count."""
    config = tiny_config(tokenizer, "mlp2x_gelu")
    tiny_model(config).save_pretrained(tmp_path)
    tiny_processor(config, tokenizer).save_pretrained(tmp_path)
    reduced = LlavaStfConfig.from_pretrained(tmp_path).with_reducer("fastervlm", {"tokens": 16})
    model = LlavaStfForConditionalGeneration.from_pretrained(tmp_path, config=reduced).eval()
    processor = LlavaStfProcessor.from_pretrained(tmp_path)  # saved with the projector's 64
    generator = Generator(model, processor)  # used at the reducer's count
    requests = [Request.single(q, make_image(i)) for i, q in enumerate(["What is shown?", "Describe it."])]
    inputs = generator.encode(requests)
    assert int((inputs["input_ids"][0] == model.config.image_token_id).sum()) == 16
    settings = GenerationSettings(max_new_tokens=5)
    both = generator.generate(requests, settings)
    assert both == [generator.generate([r], settings)[0] for r in requests]
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
