"""``LlavaStfForConditionalGeneration``: forward, equivalence with transformers' LLaVA, save / load, generation."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from llava_stf.model import PROJECTORS, LlavaStfConfig, LlavaStfForConditionalGeneration, LlavaStfProcessor
from llava_stf.model.projectors import Projector
from llava_stf.testing import (
    IMAGE_TOKEN,
    make_image,
    save_tiny_checkpoint,
    tiny_config,
    tiny_model,
    tiny_processor,
    tiny_text_config,
    tiny_vision_config,
)

PROMPTS = [
    f"USER: {IMAGE_TOKEN}\nWhat is shown in the image? ASSISTANT:",
    f"USER: {IMAGE_TOKEN}\nDescribe the image briefly. How many shapes are there? Answer with one word. ASSISTANT:",
]
GEN_KWARGS = {"max_new_tokens": 8, "do_sample": False}


def two_images():
    return [make_image(seed=1, size=(48, 40)), make_image(seed=2, size=(30, 52))]


def build(tokenizer, projector_type, seed=0, **config_kwargs):
    config = tiny_config(tokenizer, projector_type, **config_kwargs)
    return tiny_model(config, seed), tiny_processor(config, tokenizer)


def new_tokens(output: torch.Tensor, prompt_len: int, eos_id: int) -> list[list[int]]:
    """Generated ids after the prompt, cut after the first EOS (later positions are padding in a batch)."""
    rows = []
    for row in output[:, prompt_len:].tolist():
        rows.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return rows


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


# ------------------------------------------------------------------------------------------------ forward pass
@pytest.mark.parametrize("name", list(PROJECTORS))
def test_forward_and_loss_for_every_projector(tokenizer, name):
    model, processor = build(tokenizer, name)
    n_tokens = model.config.num_image_tokens
    batch = processor(images=two_images(), text=PROMPTS)
    image_id = model.config.image_token_id
    assert ((batch["input_ids"] == image_id).sum(dim=1) == n_tokens).all()
    model.train()
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == image_id, -100)
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert out.logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(out.loss)
    assert [f.shape for f in out.image_outputs.pooler_output] == [(n_tokens, model.config.text_config.hidden_size)] * 2
    out.loss.backward()
    for pname, param in model.model.multi_modal_projector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize(
    ("name", "config_kwargs"),
    [(name, {}) for name in PROJECTORS]
    + [
        ("mlp2x_gelu", {"vision_feature_select_strategy": "full"}),
        ("mbtf", {"vision_feature_select_strategy": "full"}),
        ("stf", {"vision_feature_layer": [3, -2]}),
        ("mbtf_stf", {"vision_feature_layer": [1, 5, -1]}),
    ],
)
def test_image_features_concatenate_the_configured_layers_in_order(tokenizer, name, config_kwargs):
    model, processor = build(tokenizer, name, **config_kwargs)
    pixel_values = processor.preprocess_images(two_images())
    layers = model.config.vision_layers
    keep_cls = model.config.vision_feature_select_strategy == "full"
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        assert len(hidden) == model.config.vision_config.num_hidden_layers + 1
        selected = torch.cat([hidden[i] if keep_cls else hidden[i][:, 1:] for i in layers], dim=-1)
        expected = model.model.multi_modal_projector(selected)
        features = model.get_image_features(pixel_values=pixel_values).pooler_output
    assert len(features) == 2
    for i in range(2):
        assert features[i].shape == (model.config.num_image_tokens, model.config.text_config.hidden_size)
        torch.testing.assert_close(features[i], expected[i], rtol=1e-5, atol=1e-6)
    if len(layers) > 1:  # the order matters: reversing the list changes the features
        reversed_sel = torch.cat([hidden[i] if keep_cls else hidden[i][:, 1:] for i in reversed(layers)], dim=-1)
        with torch.no_grad():
            assert not torch.allclose(model.model.multi_modal_projector(reversed_sel), expected, atol=1e-4)


@pytest.mark.parametrize("name", ["mbtf_stf", "mlp2x_gelu"])
def test_image_rows_replace_placeholders_in_order(tokenizer, name):
    """One prompt with two images: image 0's rows fill the first run of placeholders, image 1's the second."""
    model, processor = build(tokenizer, name)
    text = f"USER: {IMAGE_TOKEN} and {IMAGE_TOKEN}\nAre they the same? ASSISTANT:"
    batch = processor(images=two_images(), text=text)
    with torch.no_grad():
        features = torch.cat(list(model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output))
        embeds = model.get_input_embeddings()(batch["input_ids"]).clone()
        positions = (batch["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
        assert positions.numel() == 2 * model.config.num_image_tokens
        embeds[0, positions] = features
        expected = model.lm_head(model.model.language_model(inputs_embeds=embeds).last_hidden_state)
        actual = model(**batch).logits
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        # swapping the two images changes the answer (the order is not lost)
        swapped = dict(batch)
        swapped["pixel_values"] = batch["pixel_values"].flip(0)
        assert not torch.allclose(model(**swapped).logits, actual, atol=1e-4)


def test_projector_gets_pytorch_default_init(session_tokenizer):
    """kaiming_uniform(a=sqrt(5)): |w| <= 1/sqrt(fan_in), std = bound/sqrt(3); not the normal(0, 0.02) HF init."""
    for name, cls in PROJECTORS.items():
        if cls.reset_parameters is not Projector.reset_parameters:
            continue  # the projector's paper has its own init (TokenPacker), tested in the projector's test file
        model = tiny_model(tiny_config(session_tokenizer, name))
        projector = model.model.multi_modal_projector
        assert isinstance(projector, Projector)
        layers = [m for m in projector.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        assert layers, name
        for layer in layers:
            bound = 1 / math.sqrt(layer.weight[0].numel())
            assert layer.weight.abs().max() <= bound + 1e-7, name
            assert layer.weight.std() > 0.8 * bound / math.sqrt(3), name
            assert layer.bias.abs().max() <= bound + 1e-7, name
            assert layer.bias.abs().max() > 0.5 * bound, name


def test_seeded_models_are_identical_and_seeds_differ(session_tokenizer):
    config = tiny_config(session_tokenizer, "mbtf_stf")
    a, b, c = tiny_model(config, 0), tiny_model(config, 0), tiny_model(config, 1)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    proj = "model.multi_modal_projector.stf.fusion.weight"
    assert not torch.equal(a.state_dict()[proj], c.state_dict()[proj])


# ------------------------------------------------------------------------------------ transformers' LLaVA parity
def hf_llava(tokenizer, image_token_id, seed=0) -> LlavaForConditionalGeneration:
    config = LlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(len(tokenizer)),
        image_token_index=image_token_id,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


@pytest.fixture
def hf_and_batch(tokenizer, image_token_id):
    hf = hf_llava(tokenizer, image_token_id)
    processor = tiny_processor(tiny_config(tokenizer, "mlp2x_gelu"), tokenizer)
    assert processor.num_image_tokens == 64
    tokenizer.padding_side = "left"
    batch = processor(images=two_images(), text=PROMPTS)
    return hf, batch


def test_llava_hf_checkpoint_loads_and_matches(hf_and_batch, tmp_path):
    hf, batch = hf_and_batch
    hf.save_pretrained(tmp_path)
    model, info = LlavaStfForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    model.eval()
    assert isinstance(model.config, LlavaStfConfig)
    assert model.config.projector_type == "mlp2x_gelu"
    assert model.config.num_image_tokens == 64
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf_state = hf.state_dict()
    assert set(model.state_dict()) == set(hf_state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, hf_state[key]), key
    torch.testing.assert_close(logits(model, batch), logits(hf, batch), rtol=0, atol=1e-5)
    with torch.no_grad():
        expected = hf.generate(**batch, **GEN_KWARGS)
        actual = model.generate(**batch, **GEN_KWARGS)
    assert actual.shape == expected.shape
    assert torch.equal(actual, expected)


def test_llava_hf_state_dict_copies_directly(hf_and_batch, session_tokenizer):
    hf, batch = hf_and_batch
    model = tiny_model(tiny_config(session_tokenizer, "mlp2x_gelu"), seed=123)
    assert not torch.allclose(logits(model, batch), logits(hf, batch), atol=1e-3)  # different weights first
    result = model.load_state_dict(hf.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(logits(model, batch), logits(hf, batch), rtol=0, atol=1e-5)


def test_saved_checkpoint_uses_the_llava_hf_key_layout(hf_and_batch, session_tokenizer, tmp_path):
    hf, _ = hf_and_batch
    hf.save_pretrained(tmp_path / "hf")
    tiny_model(tiny_config(session_tokenizer, "mlp2x_gelu")).save_pretrained(tmp_path / "stf")

    def keys(folder):
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            return set(f.keys())

    assert keys(tmp_path / "stf") == keys(tmp_path / "hf")


# ----------------------------------------------------------------------------------------- save / Auto* round trip
@pytest.mark.parametrize("aspect", ["pad", "square"])
@pytest.mark.parametrize("name", ["mbtf_stf", "mlp2x_gelu"])
def test_auto_classes_round_trip(tokenizer, tmp_path, name, aspect):
    config = tiny_config(tokenizer, name)
    model = tiny_model(config, seed=7)
    processor = tiny_processor(config, tokenizer, image_aspect_ratio=aspect)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    loaded.eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is LlavaStfForConditionalGeneration
    assert type(loaded_processor) is LlavaStfProcessor
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config.projector_type == name
    assert loaded.config.projector_kwargs == config.projector_kwargs
    assert loaded.config.vision_feature_layer == config.vision_feature_layer
    assert loaded_processor.num_image_tokens == processor.num_image_tokens == config.num_image_tokens
    assert loaded_processor.image_aspect_ratio == aspect
    assert loaded_processor.image_token_id == processor.image_token_id

    batch = processor(images=two_images(), text=PROMPTS)
    loaded_batch = loaded_processor(images=two_images(), text=PROMPTS)
    assert set(batch) == set(loaded_batch)
    for key in batch:
        assert torch.equal(batch[key], loaded_batch[key]), key
    assert torch.equal(logits(loaded, loaded_batch), logits(model, batch))


def test_save_tiny_checkpoint_loads_with_auto_classes(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "ckpt", "stf", seed=3, window=4)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    assert model.config.projector_type == "stf" and model.config.projector_kwargs["window"] == 4
    assert processor.num_image_tokens == model.config.num_image_tokens == 4
    batch = processor(images=[make_image(0)], text=[PROMPTS[0]])
    assert logits(model, batch).shape[:2] == batch["input_ids"].shape


# --------------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", ["mbtf_stf", "mlp2x_gelu"])
def test_generate_with_and_without_cache_agree(tokenizer, name):
    model, processor = build(tokenizer, name)
    batch = processor(images=[make_image(5)], text=[PROMPTS[1]])
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **GEN_KWARGS)
        uncached = model.generate(**batch, use_cache=False, **GEN_KWARGS)
    assert cached.shape[1] > batch["input_ids"].shape[1]
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", ["mbtf_stf", "mlp2x_gelu"])
def test_left_padded_batch_matches_single_prompts(tokenizer, name):
    model, processor = build(tokenizer, name)
    tokenizer.padding_side = "left"
    images = two_images()
    eos = model.config.text_config.eos_token_id
    batch = processor(images=images, text=PROMPTS)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert lengths[0] != lengths[1]
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()  # padded on the left
    with torch.no_grad():
        batched = new_tokens(model.generate(**batch, **GEN_KWARGS), batch["input_ids"].shape[1], eos)
        for i in range(2):
            single = processor(images=[images[i]], text=[PROMPTS[i]])
            assert single["input_ids"].shape[1] == lengths[i]
            alone = new_tokens(model.generate(**single, **GEN_KWARGS), single["input_ids"].shape[1], eos)
            assert batched[i] == alone[0], f"prompt {i}"


# -------------------------------------------------------------------------------------------- placeholder checks
@pytest.mark.parametrize("name", ["mbtf_stf", "mlp2x_gelu"])
def test_placeholder_count_mismatch_raises_with_both_numbers(tokenizer, name):
    model, processor = build(tokenizer, name)
    n = model.config.num_image_tokens
    batch = processor(images=[make_image(0)], text=[PROMPTS[0]])
    ids = batch["input_ids"]
    image_positions = (ids[0] == model.config.image_token_id).nonzero().squeeze(1)
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[image_positions[0]] = False
    short_ids, short_mask = ids[:, keep], batch["attention_mask"][:, keep]
    with pytest.raises(ValueError) as info, torch.no_grad():
        model(input_ids=short_ids, attention_mask=short_mask, pixel_values=batch["pixel_values"])
    assert str(n - 1) in str(info.value) and str(n) in str(info.value)

    # one placeholder too many
    long_ids = torch.cat([ids[:, :1], ids[:, image_positions[:1]], ids[:, 1:]], dim=1)
    long_mask = torch.ones_like(long_ids)
    with pytest.raises(ValueError) as info, torch.no_grad():
        model(input_ids=long_ids, attention_mask=long_mask, pixel_values=batch["pixel_values"])
    assert str(n + 1) in str(info.value) and str(n) in str(info.value)

    # same check when the placeholders are found from the embeddings
    embeds = model.get_input_embeddings()(short_ids)
    with pytest.raises(ValueError) as info, torch.no_grad():
        model(inputs_embeds=embeds, attention_mask=short_mask, pixel_values=batch["pixel_values"])
    assert str(n - 1) in str(info.value) and str(n) in str(info.value)

    # and the unmodified batch runs
    with torch.no_grad():
        assert model(**batch).logits.shape[1] == ids.shape[1]
