"""AnyRes (LLaVA-NeXT): ``LlavaStfNextForConditionalGeneration`` against transformers' own ``LlavaNext`` classes."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)

from llava_stf.model import (
    PROJECTORS,
    LlavaStfNextConfig,
    LlavaStfNextForConditionalGeneration,
    LlavaStfNextProcessor,
)
from llava_stf.model.anyres import CropGrid, image_token_count
from llava_stf.model.projectors import ProjectorConfigError
from llava_stf.testing import (
    IMAGE_TOKEN,
    TINY_NEXT_PATCH,
    TINY_PINPOINTS,
    make_image,
    tiny_next_config,
    tiny_next_image_processor,
    tiny_next_model,
    tiny_next_processor,
    tiny_text_config,
    tiny_tokenizer,
    tiny_vision_config,
)

# (width, height): square, landscape, portrait, one crop's size, an extreme aspect ratio
SIZES = [(112, 112), (90, 40), (40, 90), (56, 56), (200, 70)]
PROMPT = f"USER: {IMAGE_TOKEN}\nWhat is shown in the image? ASSISTANT:"


@pytest.fixture(scope="module")
def llava_hf_next(tmp_path_factory, session_tokenizer):
    """A checkpoint saved by transformers' own ``LlavaNextForConditionalGeneration`` (llava-hf v1.6 layout)."""
    config = LlavaNextConfig(
        vision_config=tiny_vision_config(image_size=56, patch_size=TINY_NEXT_PATCH).to_dict(),
        text_config=tiny_text_config(len(session_tokenizer)).to_dict(),
        image_token_index=session_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=TINY_PINPOINTS,
    )
    torch.manual_seed(0)
    reference = LlavaNextForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("llava_next_hf")
    reference.save_pretrained(path)
    processor = LlavaNextProcessor(
        image_processor=tiny_next_image_processor(),
        tokenizer=session_tokenizer,
        patch_size=TINY_NEXT_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return reference, path, processor


def test_llava_hf_next_checkpoint_loads_as_mlp2x_gelu_with_identical_logits(llava_hf_next, session_tokenizer):
    reference, path, ref_processor = llava_hf_next
    model = LlavaStfNextForConditionalGeneration.from_pretrained(path).eval()
    assert model.config.projector_type == "mlp2x_gelu" and model.config.crop_grid == CropGrid(8, 8)
    ours = tiny_next_processor(model.config, session_tokenizer)
    for size in SIZES:
        image = make_image(seed=sum(size), size=size)
        a = ours(images=[image], text=PROMPT)
        b = ref_processor(images=[image], text=PROMPT, return_tensors="pt")
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["image_sizes"], b["image_sizes"])
        assert torch.equal(a["input_ids"], b["input_ids"]), size  # same placeholder count at the same place
        with torch.no_grad():
            torch.testing.assert_close(model(**a).logits, reference(**b).logits, atol=1e-5, rtol=0)
            kwargs = dict(max_new_tokens=6, do_sample=False)
            assert torch.equal(model.generate(**a, **kwargs), reference.generate(**b, **kwargs))


def test_placeholder_counts_equal_llava_next_processor(llava_hf_next, session_tokenizer):
    _, path, ref_processor = llava_hf_next
    config = LlavaStfNextConfig.from_pretrained(path)
    ours = tiny_next_processor(config, session_tokenizer)
    for height, width in [(56, 56), (57, 200), (300, 20), (112, 112), (100, 101), (672, 672)]:
        expected = ref_processor._get_number_of_features(height, width, 56, 56) - 1  # "default": CLS dropped
        assert ours.image_token_count(height, width) == config.image_token_count(height, width) == expected


def test_672_image_costs_2928_tokens_with_mlp_and_720_plus_newlines_with_mbtf_stf():
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert image_token_count(672, 672, pinpoints, 336, CropGrid(24, 24)) == 5 * 576 + 48
    assert image_token_count(672, 672, pinpoints, 336, CropGrid(12, 12)) == 5 * 144 + 24


@pytest.mark.parametrize("projector_type", sorted(PROJECTORS))
def test_every_projector_declares_its_crop_grid(projector_type, session_tokenizer):
    config = tiny_next_config(session_tokenizer, projector_type)
    grid = config.crop_grid
    assert grid.tokens == config.num_image_tokens
    model = tiny_next_model(config)
    processor = tiny_next_processor(config, session_tokenizer)
    image = make_image(seed=3, size=(90, 40))
    inputs = processor(images=[image], text=PROMPT)
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    assert [len(f) for f in features] == [processor.image_token_count(40, 90)]


def test_packing_follows_the_fused_grid_rows_and_newlines(session_tokenizer):
    """With k = 2 each row of the unpadded 4x4-per-tile grid ends in image_newline; a 112x112 image: 16 + 8 x 9."""
    config = tiny_next_config(session_tokenizer, "mbtf_stf")
    model = tiny_next_model(config)
    processor = tiny_next_processor(config, session_tokenizer)
    inputs = processor(images=[make_image(seed=4, size=(112, 112))], text=PROMPT)
    with torch.no_grad():
        (features,) = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    assert len(features) == 16 + 8 * 9
    rows = features[16:].reshape(8, 9, -1)
    assert torch.equal(rows[:, -1], model.model.image_newline.expand(8, -1))
    assert not torch.isclose(rows[:, :-1], model.model.image_newline).all(-1).any()


def test_stf_with_several_tokens_per_window_keeps_them_adjacent(session_tokenizer):
    config = tiny_next_config(session_tokenizer, "stf", {"fused_tokens": 2})
    assert config.crop_grid == CropGrid(4, 4, 2)
    model = tiny_next_model(config)
    processor = tiny_next_processor(config, session_tokenizer)
    inputs = processor(images=[make_image(seed=5, size=(112, 56))], text=PROMPT)  # 1x2 tiles, no padding
    with torch.no_grad():
        tiles = model.model.multi_modal_projector(
            model.model.vision_tower(inputs["pixel_values"][0], output_hidden_states=True).hidden_states[-2][:, 1:]
        )
        (features,) = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    first_row = features[32 : 32 + 2 * 4 * 2]  # row 0: tile 0's first window row, then tile 1's
    expected = torch.cat([tiles[1, :8], tiles[2, :8]])
    torch.testing.assert_close(first_row, expected)


def test_batch_of_different_tile_counts_equals_one_by_one():
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    config = tiny_next_config(tokenizer, "mbtf_stf")
    model = tiny_next_model(config)
    processor = tiny_next_processor(config, tokenizer)
    images = [make_image(seed=6, size=(112, 112)), make_image(seed=7, size=(40, 90)), make_image(seed=8, size=(56, 56))]
    texts = [PROMPT, f"{IMAGE_TOKEN} a short one", f"Look: {IMAGE_TOKEN}\nWhat colour is it? Answer briefly."]
    kwargs = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        batch = model.generate(**processor(images=images, text=texts), **kwargs)[:, -6:]
        alone = [model.generate(**processor(images=[i], text=t), **kwargs)[0, -6:] for i, t in zip(images, texts)]
    assert torch.equal(batch, torch.stack(alone))


def test_save_and_load_through_the_auto_classes(tmp_path, session_tokenizer):
    config = tiny_next_config(session_tokenizer, "mbtf_stf")
    model, processor = tiny_next_model(config), tiny_next_processor(config, session_tokenizer)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "llava_stf_next"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, LlavaStfNextForConditionalGeneration)
    assert isinstance(loaded_processor, LlavaStfNextProcessor) and loaded_processor.crop_grid == [4, 4, 1]
    inputs = loaded_processor(images=[make_image(seed=9, size=(70, 30))], text=PROMPT)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_wrong_placeholder_count_names_the_anyres_rule(session_tokenizer):
    config = tiny_next_config(session_tokenizer, "mbtf_stf")
    model, processor = tiny_next_model(config), tiny_next_processor(config, session_tokenizer)
    image = make_image(seed=10, size=(112, 112))
    inputs = processor(images=[image], text=PROMPT, image_tokens=[16])
    with pytest.raises(ValueError, match="image_token_count"):
        model(**inputs)


def test_bad_settings_fail_at_construction(session_tokenizer):
    with pytest.raises(ValueError, match="multiple of the vision crop size 56"):
        tiny_next_config(session_tokenizer, image_grid_pinpoints=[[56, 100]])
    with pytest.raises(ProjectorConfigError, match="vision_feature_select_strategy must be 'default'"):
        tiny_next_config(session_tokenizer, "mlp2x_gelu", vision_feature_select_strategy="full")
    with pytest.raises(TypeError, match="image_inputs"):
        tiny_next_processor(tiny_next_config(session_tokenizer)).preprocess_images([make_image()])
