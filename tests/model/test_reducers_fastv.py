"""FastV inside the LLM: no-op settings, the ranking, real token removal with original positions, KV-cache
generation, batching and SDPA / eager agreement."""

from __future__ import annotations

import copy

import pytest
import torch

from llava_stf.model import LlavaStfConfig
from llava_stf.model.reducers import TokenDropLlamaModel, kept_image_tokens
from llava_stf.testing import IMAGE_TOKEN, make_image, tiny_model, tiny_processor, tiny_text_config, tiny_vision_config

PROMPTS = [
    f"USER: {IMAGE_TOKEN}\nWhat is shown in the image? ASSISTANT:",
    f"USER: {IMAGE_TOKEN}\nDescribe the image briefly. How many shapes are there? ASSISTANT:",
]
LAYERS = 4


def config(tokenizer, reducer_kwargs=None, projector="mlp2x_gelu", reducer="fastv") -> LlavaStfConfig:
    return LlavaStfConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(len(tokenizer), num_hidden_layers=LAYERS),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_type=projector,
        reducer_type=reducer if reducer_kwargs is not None else None,
        reducer_kwargs=reducer_kwargs,
    )


@pytest.fixture
def pair(tokenizer):
    """(baseline model, FastV factory with the same weights, left-padded batch of two prompts)."""
    tokenizer.padding_side = "left"
    base = tiny_model(config(tokenizer))
    processor = tiny_processor(base.config, tokenizer)
    batch = processor(images=[make_image(1), make_image(2)], text=PROMPTS)

    def fastv(**kwargs):
        model = tiny_model(config(tokenizer, kwargs))
        model.load_state_dict(base.state_dict())
        return model

    return base, fastv, batch, processor


def layer_lengths(model, batch, **kwargs) -> list[int]:
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


@pytest.mark.parametrize("kwargs", [{"k": LAYERS, "r": 0.5}, {"k": 9, "r": 0.5}, {"k": 2, "r": 0.0}])
def test_noop_settings_leave_outputs_unchanged(pair, kwargs):
    base, fastv, batch, _ = pair
    model = fastv(**kwargs)
    with torch.no_grad():
        expected = base(**batch).logits
    lengths, out = layer_lengths(model, batch)
    assert lengths == [batch["input_ids"].shape[1]] * LAYERS
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("k", "r"), [(1, 0.5), (2, 0.75), (3, 0.25), (2, 1.0)])
def test_tokens_after_layer_k_are_removed(pair, k, r):
    base, fastv, batch, _ = pair
    lengths, out = layer_lengths(fastv(k=k, r=r), batch, use_cache=True)
    t, n_img = batch["input_ids"].shape[1], base.config.num_image_tokens
    dropped = n_img - kept_image_tokens(n_img, r)
    assert lengths == [t] * k + [t - dropped] * (LAYERS - k)
    cache = out.cache
    assert [cache.get_seq_length(i) for i in range(LAYERS)] == lengths  # the KV cache shrinks too
    assert out.logits.shape[:2] == batch["input_ids"].shape  # outputs keep the input length


def test_ranking_is_the_last_prompt_token_attention_at_layer_k_minus_1(pair):
    base, fastv, batch, _ = pair
    k, r = 2, 0.5
    base.set_attn_implementation("eager")
    with torch.no_grad():
        probs = base(**batch, output_attentions=True).attentions[k - 1].mean(dim=1)[:, -1]  # [B, T]
        model = fastv(k=k, r=r)
        state = model.model.language_model.drop_state(model(**batch, use_cache=True).cache)
    image = batch["input_ids"] == base.config.image_token_id
    kept = kept_image_tokens(base.config.num_image_tokens, r)
    for row in range(2):
        expected = set(probs[row].masked_fill(~image[row], -1).topk(kept).indices.tolist())
        survivors = set(state.stages[0].index[row].tolist())  # both rows have 64 image tokens: no pad slots
        assert {i for i in survivors if image[row, i]} == expected
        assert set(range(image.shape[1])) - survivors <= set(image[row].nonzero().flatten().tolist())


def masked_variant_logits(model, batch, keep, k):
    """FastV's mask variant, run layer by layer with stock modules: every token present and at its original position;
    from layer k on the dropped image tokens are hidden as keys (eager additive masks)."""
    lm = model.model.language_model
    image = batch["input_ids"] == model.config.image_token_id
    features = torch.cat(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output)
    hidden = model.get_input_embeddings()(batch["input_ids"]).masked_scatter(image[..., None], features)
    positions = (batch["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
    rope = lm.rotary_emb(hidden, positions)
    causal = torch.ones(hidden.shape[1], hidden.shape[1], dtype=torch.bool).tril()

    def additive(keys):
        allowed = causal[None] & keys[:, None, :]
        return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]

    real = batch["attention_mask"].bool()
    for i, layer in enumerate(lm.layers):
        mask = additive(real if i < k else real & keep)
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, position_ids=positions)
    return model.lm_head(lm.norm(hidden))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_in_place_pruning_equals_the_mask_variant_at_original_positions(pair, attn):
    base, fastv, batch, _ = pair
    k = 2
    model = fastv(k=k, r=0.5)
    model.set_attn_implementation(attn)
    base.set_attn_implementation("eager")
    positions = (batch["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(**batch, position_ids=positions, use_cache=True)
        state = model.model.language_model.drop_state(out.cache)
        keep = torch.zeros_like(batch["attention_mask"], dtype=torch.bool).scatter(1, state.stages[0].index, True)
        expected = masked_variant_logits(base, batch, keep, k)
    text = batch["attention_mask"].bool() & (batch["input_ids"] != base.config.image_token_id)
    torch.testing.assert_close(out.logits[text], expected[text], rtol=1e-4, atol=1e-5)
    # compacting the positions instead would change the text logits
    assert not torch.allclose(out.logits[text], base(**batch, position_ids=positions).logits[text], atol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generation_with_and_without_kv_cache_gives_the_same_tokens(pair, attn):
    _, fastv, batch, _ = pair
    model = fastv(k=2, r=0.5)
    model.set_attn_implementation(attn)
    kwargs = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        cached = model.generate(**batch, **kwargs)
        uncached = model.generate(**batch, **kwargs, use_cache=False)
    assert torch.equal(cached, uncached)


def test_batch_equals_each_prompt_alone(pair):
    _, fastv, batch, processor = pair
    model = fastv(k=1, r=0.75)
    images = [make_image(1), make_image(2)]
    kwargs = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        both = model.generate(**batch, **kwargs)
        for i in range(2):
            alone = model.generate(**processor(images=images[i : i + 1], text=PROMPTS[i : i + 1]), **kwargs)
            assert both[i, -8:].tolist() == alone[0, -8:].tolist()


def test_composes_with_a_token_reducing_projector(tokenizer):
    tokenizer.padding_side = "left"
    model = tiny_model(config(tokenizer, {"k": 1, "r": 0.5}, projector="mbtf_stf"))
    batch = tiny_processor(model.config, tokenizer)(images=[make_image(1)], text=PROMPTS[:1])
    lengths, _ = layer_lengths(model, batch)
    assert model.config.num_image_tokens == 16
    assert lengths == [batch["input_ids"].shape[1]] + [batch["input_ids"].shape[1] - 8] * (LAYERS - 1)


def test_images_after_a_pruned_prefill_are_refused(pair):
    _, fastv, batch, _ = pair
    model = fastv(k=1, r=0.5)
    with torch.no_grad():
        cache = model(**batch, use_cache=True).cache
        with pytest.raises(ValueError, match="already reduced"):
            model(**batch, cache=cache)


def test_the_language_model_is_a_llama_with_unchanged_parameter_names(pair):
    base, fastv, _, _ = pair
    model = fastv(k=2, r=0.5)
    assert isinstance(model.model.language_model, TokenDropLlamaModel)
    assert type(base.model.language_model).__name__ == "LlamaModel"
    assert list(model.state_dict()) == list(base.state_dict())


def test_a_deep_copy_drops_tokens_itself(pair):
    _, fastv, batch, _ = pair
    model = fastv(k=2, r=0.5)
    copied = copy.deepcopy(model)
    lengths, out = layer_lengths(copied, batch)
    assert lengths[-1] < lengths[0]
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(**batch).logits, rtol=0, atol=0)


def test_lora_wraps_and_merges_without_losing_the_reducer(pair):
    from llava_stf.train.stages import apply_stage, get_stage, wrap_lora

    _, fastv, batch, _ = pair
    model = fastv(k=2, r=0.5)
    apply_stage(model, get_stage("lora"))
    peft = wrap_lora(model, get_stage("lora"), r=4, alpha=8, dropout=0.0)
    lengths, _ = layer_lengths(peft.base_model.model, batch)
    assert lengths[-1] < lengths[0]  # LoRA-wrapped projections, tokens still dropped
    merged = peft.merge_and_unload()
    assert isinstance(merged.model.language_model, TokenDropLlamaModel)
    assert layer_lengths(merged, batch)[0] == lengths


def test_text_only_row_in_a_batch_pads_the_survivors_and_equals_each_alone(pair, tokenizer):
    """A text-only row keeps all its tokens while the image row loses half: the rows get different survivor counts."""
    _, fastv, _, processor = pair
    model = fastv(k=1, r=0.5)
    image_prompt, text_prompt = PROMPTS[0], "USER: What is two plus two? Answer with one long sentence. ASSISTANT:"
    kwargs = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        both = model.generate(**processor(images=[make_image(1)], text=[image_prompt, text_prompt]), **kwargs)
        alone = [
            model.generate(**processor(images=[make_image(1)], text=[image_prompt]), **kwargs),
            model.generate(**processor(text=[text_prompt]), **kwargs),
        ]
        cache = model(**processor(images=[make_image(1)], text=[image_prompt, text_prompt]), use_cache=True).cache
    for row in range(2):
        assert both[row, -6:].tolist() == alone[row][0, -6:].tolist()
    stage = model.model.language_model.drop_state(cache).stages[0]
    n_text = int(processor(text=[text_prompt])["attention_mask"].sum())
    assert stage.mask.sum(dim=1).tolist()[1] == n_text  # the text row keeps every real token, plus pad slots
    assert stage.mask.shape[1] > stage.mask.sum(dim=1).min()


def test_trains_with_gradient_checkpointing_like_without(pair):
    base, fastv, batch, _ = pair
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == base.config.image_token_id, -100)
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    losses, grads = [], []
    for checkpointing in (False, True):
        model = fastv(k=2, r=0.5).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        out = model(**batch, labels=labels)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(model.model.language_model.layers[-1].mlp.up_proj.weight.grad)
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sdpa_fp32_and_bf16(pair):
    base, fastv, batch, _ = pair
    batch = batch.to("cuda")
    kwargs = dict(max_new_tokens=8, do_sample=False)
    model = fastv(k=2, r=0.5).to("cuda")
    with torch.no_grad():
        assert torch.equal(model.generate(**batch, **kwargs), model.generate(**batch, **kwargs, use_cache=False))
        model.to(torch.bfloat16)
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        lengths, out = layer_lengths(model, batch, use_cache=True)
    t = batch["input_ids"].shape[1]
    assert lengths == [t, t] + [t - 32] * (LAYERS - 2) and out.logits.dtype == torch.bfloat16
