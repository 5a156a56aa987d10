"""DART inside the LLM: the published rule checked by hand on the stock model, real token removal at original
positions, SDPA / eager, KV cache, batching, FLOPs, the token budget and generation through ``Generator``."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_stf.flops import count_flops
from llava_stf.generation import GenerationSettings, Generator, Request
from llava_stf.model import LlavaStfConfig, LlavaStfForConditionalGeneration, LlavaStfProcessor
from llava_stf.model.presets import load_preset
from llava_stf.model.reducers import DART, DARTParams, ReducerConfigError, budget_kwargs
from llava_stf.testing import IMAGE_TOKEN, make_image, tiny_model, tiny_processor, tiny_text_config, tiny_vision_config

PROMPTS = [
    f"USER: {IMAGE_TOKEN}\nWhat is shown in the image? ASSISTANT:",
    f"USER: {IMAGE_TOKEN}\nDescribe the image briefly. How many shapes are there? ASSISTANT:",
]
LAYERS = 4
N_IMAGE = 64  # tiny tower: 8 x 8 patches, mlp2x_gelu


def config(tokenizer, reducer_kwargs=None) -> LlavaStfConfig:
    return LlavaStfConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(len(tokenizer), num_hidden_layers=LAYERS),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_type="mlp2x_gelu",
        reducer_type="dart" if reducer_kwargs is not None else None,
        reducer_kwargs=reducer_kwargs,
    )


@pytest.fixture
def pair(tokenizer):
    """(baseline model, DART factory with the same weights, left-padded batch of two prompts, processor)."""
    tokenizer.padding_side = "left"
    base = tiny_model(config(tokenizer))
    with torch.no_grad():  # RMSNorm weights start at 1; varied, they make the final norm change cosine similarities
        for name, weight in base.model.language_model.named_parameters():
            if name.endswith("norm.weight"):
                weight.uniform_(0.5, 1.5)
    processor = tiny_processor(base.config, tokenizer)
    batch = processor(images=[make_image(1), make_image(2)], text=PROMPTS)

    def dart(**kwargs):
        model = tiny_model(config(tokenizer, kwargs))
        model.load_state_dict(base.state_dict())
        return model

    return base, dart, batch, processor


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


def survivors(model, batch, **kwargs) -> torch.Tensor:
    """``[B, T]`` bool: the positions the reducer kept (from the drop state of its KV cache)."""
    with torch.no_grad():
        out = model(**batch, position_ids=positions_of(batch), use_cache=True, **kwargs)
    stage = model.model.language_model.drop_state(out.cache).stages[0]
    keep = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    return keep.scatter(1, stage.index, stage.mask) | (batch["attention_mask"] == 0)


def reference_dart(base, batch, k, r, image_pivots=4, text_pivots=4) -> torch.Tensor:
    """The published rule by hand, per row, in float64 on the stock model's own tensors: layer K-1's keys as its KV
    cache stores them (after RoPE), its output from ``output_hidden_states`` through the final norm."""
    with torch.no_grad():
        out = base(**batch, position_ids=positions_of(batch), use_cache=True, output_hidden_states=True)
        keys = out.cache.layers[k - 1].keys.double()  # [B, H_kv, T, d]
        hidden = base.model.language_model.norm(out.hidden_states[k]).double()  # [B, T, D]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    keep = torch.ones_like(mask, dtype=torch.bool)
    for b in range(ids.shape[0]):
        image = [i for i in range(ids.shape[1]) if ids[b, i] == base.config.image_token_id]
        kept = int((1 - r) * len(image) + 0.5)
        l1 = [float(keys[b, :, i].abs().sum()) for i in range(ids.shape[1])]
        by_norm = sorted(range(ids.shape[1]), key=lambda i: (-l1[i], i))  # noqa: B023 - used at once
        image_pivots_b = [i for i in by_norm if i in image][: min(image_pivots, kept)]
        text = [i for i in by_norm if i > image[0] and i not in image and mask[b, i]]
        pivots = sorted(image_pivots_b + text[:text_pivots])
        chosen, free = set(image_pivots_b), [i for i in image if i not in image_pivots_b]
        claims = kept - len(image_pivots_b)
        for j, pivot in enumerate(pivots):
            quota = claims // len(pivots) + (1 if j < claims % len(pivots) else 0)
            cos = {i: float(torch.cosine_similarity(hidden[b, pivot], hidden[b, i], dim=0)) for i in free}
            picked = sorted(free, key=lambda i: (cos[i], i))[:quota]
            chosen.update(picked)
            free = [i for i in free if i not in picked]
        for i in image:
            keep[b, i] = i in chosen
    return keep


def masked_variant_logits(model, batch, keep, k):
    """Every token present at its original position, run layer by layer with stock modules; from layer k on the
    dropped image tokens are hidden as keys (eager additive masks)."""
    lm = model.model.language_model
    image = batch["input_ids"] == model.config.image_token_id
    features = torch.cat(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output)
    hidden = model.get_input_embeddings()(batch["input_ids"]).masked_scatter(image[..., None], features)
    positions = positions_of(batch)
    rope = lm.rotary_emb(hidden, positions)
    causal = torch.ones(hidden.shape[1], hidden.shape[1], dtype=torch.bool).tril()
    real = batch["attention_mask"].bool()
    for i, layer in enumerate(lm.layers):
        allowed = causal[None] & (real if i < k else real & keep)[:, None, :]
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
        hidden = layer(hidden, attention_mask=additive, position_embeddings=rope, position_ids=positions)
    return model.lm_head(lm.norm(hidden))


# ---------------------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("r", [0.5, 0.5625, 0.9])  # 32 kept (uneven claims), 28 (3 per pivot, as the code), 6
def test_survivors_are_the_published_rule_on_the_stock_model(pair, r):
    base, dart, batch, _ = pair
    expected = reference_dart(base, batch, k=2, r=r)
    assert torch.equal(survivors(dart(k=2, r=r), batch), expected)
    image = batch["input_ids"] == base.config.image_token_id
    assert (expected & image).sum(dim=1).tolist() == [int((1 - r) * N_IMAGE + 0.5)] * 2


def test_pivot_counts_are_settings(pair):
    base, dart, batch, _ = pair
    kwargs = dict(k=1, r=0.75, image_pivots=2, text_pivots=0)
    assert torch.equal(survivors(dart(**kwargs), batch), reference_dart(base, batch, **kwargs))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_in_place_pruning_equals_the_reference_mask_variant(pair, attn):
    base, dart, batch, _ = pair
    model = dart(k=2, r=0.5)
    model.set_attn_implementation(attn)
    keep = reference_dart(base, batch, k=2, r=0.5)
    with torch.no_grad():
        out = model(**batch, position_ids=positions_of(batch))
        expected = masked_variant_logits(base, batch, keep, k=2)
    text = batch["attention_mask"].bool() & (batch["input_ids"] != base.config.image_token_id)
    torch.testing.assert_close(out.logits[text], expected[text], rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------------------- removal and runs
@pytest.mark.parametrize("kwargs", [{"k": LAYERS, "r": 0.5}, {"k": 2, "r": 0.0}])
def test_noop_settings_leave_outputs_unchanged(pair, kwargs):
    base, dart, batch, _ = pair
    with torch.no_grad():
        expected = base(**batch).logits
    lengths, out = layer_lengths(dart(**kwargs), batch)
    assert lengths == [batch["input_ids"].shape[1]] * LAYERS
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("k", "r"), [(1, 0.5), (2, 0.778), (3, 1.0)])
def test_tokens_after_layer_k_are_removed_from_the_sequence_and_the_cache(pair, k, r):
    _, dart, batch, _ = pair
    lengths, out = layer_lengths(dart(k=k, r=r), batch, use_cache=True)
    t, dropped = batch["input_ids"].shape[1], N_IMAGE - int((1 - r) * N_IMAGE + 0.5)
    assert lengths == [t] * k + [t - dropped] * (LAYERS - k)
    assert [out.cache.get_seq_length(i) for i in range(LAYERS)] == lengths
    assert out.logits.shape[:2] == batch["input_ids"].shape


def test_sdpa_and_eager_keep_the_same_tokens(pair):
    _, dart, batch, _ = pair
    eager, sdpa = dart(k=2, r=0.5), dart(k=2, r=0.5)
    eager.set_attn_implementation("eager")
    sdpa.set_attn_implementation("sdpa")
    assert torch.equal(survivors(eager, batch), survivors(sdpa, batch))
    real = batch["attention_mask"].bool()  # padding rows attend to nothing: the kernels disagree there only
    with torch.no_grad():
        torch.testing.assert_close(sdpa(**batch).logits[real], eager(**batch).logits[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generation_with_and_without_kv_cache_gives_the_same_tokens(pair, attn):
    _, dart, batch, _ = pair
    model = dart(k=2, r=0.5)
    model.set_attn_implementation(attn)
    kwargs = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(**batch, **kwargs), model.generate(**batch, **kwargs, use_cache=False))


def test_batch_with_a_text_only_row_equals_each_prompt_alone(pair):
    """Different prompt lengths, left padding, and a text-only row that keeps every token."""
    _, dart, batch, processor = pair
    model = dart(k=1, r=0.75)
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
    model = tiny_model(config(tokenizer, {"k": 2, "r": 0.5}))
    model.set_attn_implementation("eager")  # FlopCounterMode sees the attention matmuls only in eager mode
    inputs = tiny_processor(model.config, tokenizer)(images=[make_image(0)], text=PROMPTS[:1])
    n_text = inputs["input_ids"].shape[1] - N_IMAGE
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs, logits_to_keep=1)
    report = count_flops(model.config, n_text)
    assert counter.get_total_flops() == report.full
    d, d_kv = 64, 32  # tiny LLM width and K/V width
    assert report.reducer == 2 * ((N_IMAGE + n_text) * d * d_kv + 8 * N_IMAGE * d)  # k_proj + 8 pivots x 64 images


@pytest.mark.parametrize("tokens", [192, 128, 64, 576])
def test_budget_keeps_exactly_the_budget_after_layer_2_on_the_7b_shapes(tokens):
    shapes = load_preset("llava-v1.5-7b").reducer_shapes()
    kwargs = budget_kwargs("dart", tokens, shapes)
    assert (kwargs["k"], kwargs["image_pivots"], kwargs["text_pivots"]) == (2, 4, 4)
    schedule = DART.llm_schedule(DARTParams(**kwargs), shapes, 576)
    assert schedule == ([(0, 576), (2, tokens)] if tokens < 576 else [(0, 576)])
    assert round(kwargs["r"], 3) == {192: 0.667, 128: 0.778, 64: 0.889, 576: 0.0}[tokens]  # the code's ratios


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, r"reducer_kwargs\.k must be an integer >= 1"),
        ({"r": 1.5}, r"reducer_kwargs\.r must be a number in \[0, 1\]"),
        ({"image_pivots": 0}, r"reducer_kwargs\.image_pivots must be an integer >= 1"),
        ({"text_pivots": -1}, r"reducer_kwargs\.text_pivots must be an integer >= 0"),
        ({"pivots": 4}, r"unknown field\(s\) \['pivots'\]"),
    ],
)
def test_bad_settings_name_the_field(tokenizer, kwargs, message):
    with pytest.raises(ReducerConfigError, match=message):
        config(tokenizer, kwargs)


def test_needs_a_llama_decoder_and_a_possible_budget():
    with pytest.raises(ReducerConfigError, match=r"reducer_type 'dart'.*text_config\.model_type is 'qwen2'"):
        LlavaStfConfig(vision_config=tiny_vision_config(), text_config={"model_type": "qwen2"}, reducer_type="dart")
    with pytest.raises(ReducerConfigError, match=r"token budget 577 for reducer_type 'dart'.*1\.\.576"):
        budget_kwargs("dart", 577, load_preset("llava-v1.5-7b").reducer_shapes())


def test_a_trained_checkpoint_runs_dart_through_the_generator(tmp_path, tokenizer):
    tokenizer.padding_side = "left"
    base = config(tokenizer)
    tiny_model(base).save_pretrained(tmp_path)
    tiny_processor(base, tokenizer).save_pretrained(tmp_path)
    reduced = LlavaStfConfig.from_pretrained(tmp_path).with_reducer("dart", {"k": 1, "r": 0.75})
    model = LlavaStfForConditionalGeneration.from_pretrained(tmp_path, config=reduced).eval()
    generator = Generator(model, LlavaStfProcessor.from_pretrained(tmp_path))
    requests = [Request.single("What is shown?", make_image(1)), Request.single("Describe the image.", make_image(2))]
    settings = GenerationSettings(max_new_tokens=4)
    answers = generator.generate(requests, settings)
    assert answers == [generator.generate([r], settings)[0] for r in requests]
    lengths, _ = layer_lengths(model, generator.encode(requests[:1]))
    assert lengths[0] - lengths[1] == N_IMAGE - 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sdpa_fp32_and_bf16(pair):
    _, dart, batch, _ = pair
    batch = batch.to("cuda")
    kwargs = dict(max_new_tokens=8, do_sample=False)
    model = dart(k=2, r=0.5).to("cuda")
    with torch.no_grad():
        assert torch.equal(model.generate(**batch, **kwargs), model.generate(**batch, **kwargs, use_cache=False))
        model.to(torch.bfloat16)
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        lengths, out = layer_lengths(model, batch, use_cache=True)
    t = batch["input_ids"].shape[1]
    assert lengths == [t, t] + [t - 32] * (LAYERS - 2) and out.logits.dtype == torch.bfloat16
