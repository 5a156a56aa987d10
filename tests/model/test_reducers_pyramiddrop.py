"""PyramidDrop inside the LLM: every stage checked against the published rule run by hand with stock modules (eager
attention weights), real removal at each stage, SDPA / eager, KV cache, batching, FLOPs, the per-budget schedules and
generation through ``Generator``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_stf.flops import count_flops
from llava_stf.generation import GenerationSettings, Generator, Request
from llava_stf.model import LlavaStfConfig, LlavaStfForConditionalGeneration, LlavaStfProcessor
from llava_stf.model.presets import load_preset
from llava_stf.model.reducers import PyramidDrop, PyramidDropParams, ReducerConfigError, budget_kwargs
from llava_stf.model.reducers.pyramiddrop import budget_layers, layer_average
from llava_stf.testing import IMAGE_TOKEN, make_image, tiny_model, tiny_processor, tiny_text_config, tiny_vision_config

PROMPTS = [
    f"USER: {IMAGE_TOKEN}\nWhat is shown in the image? ASSISTANT:",
    f"USER: {IMAGE_TOKEN}\nDescribe the image briefly. How many shapes are there? ASSISTANT:",
]
LAYERS = 4
N_IMAGE = 64  # tiny tower: 8 x 8 patches, mlp2x_gelu
STAGES = [1, 2, 3]  # L/4, L/2, 3L/4 of the tiny LLM (the paper's [8, 16, 24] of 32)


def config(tokenizer, reducer_kwargs=None) -> LlavaStfConfig:
    return LlavaStfConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(len(tokenizer), num_hidden_layers=LAYERS),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_type="mlp2x_gelu",
        reducer_type="pyramiddrop" if reducer_kwargs is not None else None,
        reducer_kwargs=reducer_kwargs,
    )


@pytest.fixture
def pair(tokenizer):
    """(baseline model, PyramidDrop factory with the same weights, left-padded batch of two prompts, processor)."""
    tokenizer.padding_side = "left"
    base = tiny_model(config(tokenizer))
    processor = tiny_processor(base.config, tokenizer)
    batch = processor(images=[make_image(1), make_image(2)], text=PROMPTS)

    def pdrop(**kwargs):
        model = tiny_model(config(tokenizer, kwargs))
        model.load_state_dict(base.state_dict())
        return model

    return base, pdrop, batch, processor


def layer_lengths(model, batch, **kwargs):
    lengths = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
        for layer in model.model.language_model.layers
    ]
    with torch.no_grad():
        out = model(**batch, **kwargs)
    for hook in hooks:
        hook.remove()
    return lengths, out


def positions_of(batch):
    return (batch["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)


def stage_survivors(model, batch, **kwargs):
    """Per stage, ``[B, T]`` bool positions still present (padding counted as present), and the logits."""
    with torch.no_grad():
        out = model(**batch, position_ids=positions_of(batch), use_cache=True, **kwargs)
    pad = batch["attention_mask"] == 0
    keeps = []
    for stage in model.model.language_model.drop_state(out.cache).stages:
        keep = torch.zeros_like(pad).scatter(1, stage.index, stage.mask)
        keeps.append(keep | pad)
    return keeps, out.logits


def reference_pdrop(base, batch, layers, ratio):
    """The published rule by hand with stock modules: every token stays at its original position; at each stage end
    ``d`` the eager attention weights of layer ``d`` on its input (dropped tokens hidden as keys) rank the living image
    tokens by the last prompt token's row, averaged over heads, and the top ``round(λ c)`` live on; from layer ``d``
    the dropped ones are hidden as keys. Returns the living positions after each stage and the logits."""
    base.set_attn_implementation("eager")
    lm = base.model.language_model
    image = batch["input_ids"] == base.config.image_token_id
    with torch.no_grad():
        features = torch.cat(base.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output)
        hidden = base.get_input_embeddings()(batch["input_ids"]).masked_scatter(image[..., None], features)
        positions = positions_of(batch)
        rope = lm.rotary_emb(hidden, positions)
        causal = torch.ones(hidden.shape[1], hidden.shape[1], dtype=torch.bool).tril()
        real, alive, keeps = batch["attention_mask"].bool(), torch.ones_like(image), []

        def additive(keys):
            allowed = causal[None] & keys[:, None, :]
            return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]

        for i, layer in enumerate(lm.layers):
            if i in layers:
                _, weights = layer.self_attn(layer.input_layernorm(hidden), rope, additive(real & alive))
                scores = weights[:, :, -1].mean(dim=1)  # [B, T]: the last prompt token's row (left padding)
                for b in range(image.shape[0]):
                    living = [j for j in range(image.shape[1]) if image[b, j] and alive[b, j]]
                    ranked = sorted(living, key=lambda j: (-float(scores[b, j]), j))
                    for j in ranked[int(ratio * len(living) + 0.5) :]:
                        alive[b, j] = False
                keeps.append(alive.clone())
            hidden = layer(hidden, attention_mask=additive(real & alive), position_embeddings=rope)
        return keeps, base.lm_head(lm.norm(hidden))


# ---------------------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(("layers", "ratio"), [(STAGES, 0.5), ([1, 3], 0.3)])
def test_every_stage_is_the_published_rule_on_stock_modules(pair, attn, layers, ratio):
    base, pdrop, batch, _ = pair
    model = pdrop(layers=layers, ratio=ratio)
    model.set_attn_implementation(attn)
    keeps, logits = stage_survivors(model, batch)
    expected_keeps, expected_logits = reference_pdrop(base, batch, layers, ratio)
    assert len(keeps) == len(layers)
    for keep, expected in zip(keeps, expected_keeps):
        assert torch.equal(keep, expected)
    text = batch["attention_mask"].bool() & (batch["input_ids"] != base.config.image_token_id)
    torch.testing.assert_close(logits[text], expected_logits[text], rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------------------- removal and runs
@pytest.mark.parametrize("kwargs", [{"layers": STAGES, "ratio": 1.0}, {"layers": [8, 16, 24], "ratio": 0.5}])
def test_noop_settings_leave_outputs_unchanged(pair, kwargs):
    base, pdrop, batch, _ = pair
    with torch.no_grad():
        expected = base(**batch).logits
    lengths, out = layer_lengths(pdrop(**kwargs), batch)
    assert lengths == [batch["input_ids"].shape[1]] * LAYERS
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("layers", "ratio", "image_counts"),
    [(STAGES, 0.5, [64, 32, 16, 8]), ([2, 9], 0.25, [64, 64, 16, 16]), ([1, 2], 0.0, [64, 0, 0, 0])],
)
def test_each_stage_removes_tokens_from_the_sequence_and_the_cache(pair, layers, ratio, image_counts):
    _, pdrop, batch, _ = pair
    lengths, out = layer_lengths(pdrop(layers=layers, ratio=ratio), batch, use_cache=True)
    t = batch["input_ids"].shape[1]
    assert lengths == [t - N_IMAGE + n for n in image_counts]
    assert [out.cache.get_seq_length(i) for i in range(LAYERS)] == lengths
    assert out.logits.shape[:2] == batch["input_ids"].shape
    shapes = pdrop(layers=layers, ratio=ratio).model.reducer.shapes
    schedule = PyramidDrop.llm_schedule(PyramidDropParams(layers=layers, ratio=ratio), shapes, N_IMAGE)
    assert [[n for start, n in schedule if start <= layer][-1] for layer in range(LAYERS)] == image_counts


def test_sdpa_and_eager_keep_the_same_tokens(pair):
    _, pdrop, batch, _ = pair
    eager, sdpa = pdrop(layers=STAGES, ratio=0.5), pdrop(layers=STAGES, ratio=0.5)
    eager.set_attn_implementation("eager")
    sdpa.set_attn_implementation("sdpa")
    (eager_keeps, eager_logits), (sdpa_keeps, sdpa_logits) = stage_survivors(eager, batch), stage_survivors(sdpa, batch)
    assert all(torch.equal(a, b) for a, b in zip(eager_keeps, sdpa_keeps))
    real = batch["attention_mask"].bool()  # padding rows attend to nothing: the kernels disagree there only
    torch.testing.assert_close(sdpa_logits[real], eager_logits[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generation_with_and_without_kv_cache_gives_the_same_tokens(pair, attn):
    _, pdrop, batch, _ = pair
    model = pdrop(layers=STAGES, ratio=0.5)
    model.set_attn_implementation(attn)
    kwargs = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(**batch, **kwargs), model.generate(**batch, **kwargs, use_cache=False))


def test_batch_with_a_text_only_row_equals_each_prompt_alone(pair):
    """Different prompt lengths, left padding, and a text-only row that keeps every token at every stage."""
    _, pdrop, _, processor = pair
    model = pdrop(layers=STAGES, ratio=0.4)
    text_prompt = "USER: What is two plus two? Answer with one long sentence. ASSISTANT:"
    kwargs = dict(max_new_tokens=6, do_sample=False)
    rows = [([make_image(1)], PROMPTS[0]), ([make_image(2)], PROMPTS[1]), ([], text_prompt)]
    with torch.no_grad():
        both = model.generate(**processor(images=[make_image(1), make_image(2)], text=[p for _, p in rows]), **kwargs)
        for row, (images, prompt) in enumerate(rows):
            alone = model.generate(**processor(images=images or None, text=[prompt]), **kwargs)
            assert both[row, -6:].tolist() == alone[0, -6:].tolist()


# ---------------------------------------------------------------------------------------- FLOPs, budget, checks
def test_flops_match_flop_counter_mode(tokenizer):
    model = tiny_model(config(tokenizer, {"layers": STAGES, "ratio": 0.5}))
    model.set_attn_implementation("eager")  # FlopCounterMode sees the attention matmuls only in eager mode
    inputs = tiny_processor(model.config, tokenizer)(images=[make_image(0)], text=PROMPTS[:1])
    n_text = inputs["input_ids"].shape[1] - N_IMAGE
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs, logits_to_keep=1)
    report = count_flops(model.config, n_text)
    assert counter.get_total_flops() == report.full
    d, d_kv = 64, 32  # one ranking per stage over the tokens reaching it: k_proj, the query's q_proj, its row
    assert report.reducer == 2 * sum((n + n_text) * d * d_kv + d * d + (n + n_text) * d for n in (64, 32, 16))
    assert report.equivalent_tokens == (64 + 32 + 16 + 8) / 4


def test_default_schedule_is_the_papers_on_the_7b_shapes():
    report = count_flops(load_preset("llava-v1.5-7b").with_reducer("pyramiddrop"))
    shapes = load_preset("llava-v1.5-7b").reducer_shapes()
    assert PyramidDrop.llm_schedule(PyramidDropParams(), shapes, 576) == [(0, 576), (8, 288), (16, 144), (24, 72)]
    assert report.equivalent_tokens == 270  # (576 + 288 + 144 + 72) / 4


@pytest.mark.parametrize(
    ("tokens", "ratio", "counts"),
    [(192, 0.5598, [576, 322, 180, 101]), (128, 0.4194, [576, 242, 101, 42]), (64, 0.1919, [576, 111, 21, 4])],
)
def test_budgets_follow_the_documented_schedule_on_the_7b_shapes(tokens, ratio, counts):
    shapes = load_preset("llava-v1.5-7b").reducer_shapes()
    kwargs = budget_kwargs("pyramiddrop", tokens, shapes)
    assert kwargs == {"layers": [2, 8, 16], "ratio": ratio}  # PyramidDrop#29: stages 2, 8, 16, λ = 0.19 for 64
    schedule = PyramidDrop.llm_schedule(PyramidDropParams(**kwargs), shapes, 576)
    assert schedule == list(zip([0, 2, 8, 16], counts))
    assert abs(layer_average(schedule, 32) - tokens) <= 0.5
    assert count_flops(load_preset("llava-v1.5-7b").with_reducer("pyramiddrop", kwargs)).equivalent_tokens == (
        layer_average(schedule, 32)
    )


def test_every_reachable_budget_lands_within_half_a_token():
    shapes = load_preset("llava-v1.5-7b").reducer_shapes()
    for tokens in range(36, 513):
        kwargs = budget_kwargs("pyramiddrop", tokens, shapes)
        schedule = PyramidDrop.llm_schedule(PyramidDropParams(**kwargs), shapes, 576)
        assert abs(layer_average(schedule, 32) - tokens) <= 0.5, tokens
    assert budget_kwargs("pyramiddrop", 576, shapes) == {"layers": [2, 8, 16], "ratio": 1.0}
    with pytest.raises(ReducerConfigError, match=r"token budget 35 .* below 36.*after layer 2"):
        budget_kwargs("pyramiddrop", 35, shapes)


def test_budget_stages_scale_with_depth():
    assert [budget_layers(depth) for depth in (3, 4, 32, 40)] == [None, [1, 2, 3], [2, 8, 16], [3, 10, 20]]
    shallow = dataclasses.replace(load_preset("llava-v1.5-7b").reducer_shapes(), num_text_layers=3)
    with pytest.raises(ReducerConfigError, match="needs at least 4 text layers"):
        budget_kwargs("pyramiddrop", 128, shallow)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": [8, 8]}, r"reducer_kwargs\.layers must be strictly ascending"),
        ({"layers": [0, 8]}, r"reducer_kwargs\.layers\[\] must be an integer >= 1"),
        ({"layers": 8}, r"reducer_kwargs\.layers must be a non-empty list"),
        ({"ratio": 1.5}, r"reducer_kwargs\.ratio must be a number in \[0, 1\]"),
        ({"layer_list": [8]}, r"unknown field\(s\) \['layer_list'\]"),
    ],
)
def test_bad_settings_name_the_field(tokenizer, kwargs, message):
    with pytest.raises(ReducerConfigError, match=message):
        config(tokenizer, kwargs)


def test_needs_a_llama_decoder():
    with pytest.raises(ReducerConfigError, match=r"reducer_type 'pyramiddrop'.*text_config\.model_type is 'qwen2'"):
        LlavaStfConfig(
            vision_config=tiny_vision_config(), text_config={"model_type": "qwen2"}, reducer_type="pyramiddrop"
        )


def test_a_trained_checkpoint_runs_pyramiddrop_through_the_generator(tmp_path, tokenizer):
    base = config(tokenizer)
    tiny_model(base).save_pretrained(tmp_path)
    tiny_processor(base, tokenizer).save_pretrained(tmp_path)
    reduced = LlavaStfConfig.from_pretrained(tmp_path).with_reducer("pyramiddrop", {"layers": STAGES, "ratio": 0.5})
    model = LlavaStfForConditionalGeneration.from_pretrained(tmp_path, config=reduced).eval()
    generator = Generator(model, LlavaStfProcessor.from_pretrained(tmp_path))
    requests = [Request.single("What is shown?", make_image(1)), Request.single("Describe the image.", make_image(2))]
    settings = GenerationSettings(max_new_tokens=4)
    answers = generator.generate(requests, settings)
    assert answers == [generator.generate([r], settings)[0] for r in requests]
    lengths, _ = layer_lengths(model, generator.encode(requests[:1]))
    assert [lengths[0] - n for n in lengths] == [0, 32, 48, 56]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sdpa_fp32_and_bf16(pair):
    _, pdrop, batch, _ = pair
    batch = batch.to("cuda")
    kwargs = dict(max_new_tokens=8, do_sample=False)
    model = pdrop(layers=STAGES, ratio=0.5).to("cuda")
    with torch.no_grad():
        assert torch.equal(model.generate(**batch, **kwargs), model.generate(**batch, **kwargs, use_cache=False))
        model.to(torch.bfloat16)
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        lengths, out = layer_lengths(model, batch, use_cache=True)
    t = batch["input_ids"].shape[1]
    assert lengths == [t, t - 32, t - 48, t - 56] and out.logits.dtype == torch.bfloat16
