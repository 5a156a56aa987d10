"""The builder with ``image_grid_pinpoints``: an AnyRes (LLaVA-NeXT) model from separately saved towers (tiny)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    LlamaForCausalLM,
)

from llava_stf.model import LlavaStfNextForConditionalGeneration, LlavaStfNextProcessor
from llava_stf.model.builder import build_model
from llava_stf.testing import (
    TINY_NEXT_CROP,
    TINY_NEXT_PATCH,
    TINY_PINPOINTS,
    make_image,
    tiny_text_config,
    tiny_tokenizer,
    tiny_vision_config,
)

PROMPT = "USER: <image>\nWhat is it? ASSISTANT:"
MEAN, STD = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)  # not CLIP's, so the AnyRes processor must take them over


def _save_towers(tmp_path):
    """A vision-only CLIP at 56-px crops (patch 7) and a Llama whose tokenizer lacks <image> and pad."""
    tower = CLIPVisionModel(tiny_vision_config(image_size=TINY_NEXT_CROP, patch_size=TINY_NEXT_PATCH))
    tower.save_pretrained(tmp_path / "clip")
    crop = {"height": TINY_NEXT_CROP, "width": TINY_NEXT_CROP}
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_NEXT_CROP}, crop_size=crop, image_mean=MEAN, image_std=STD
    )
    image_processor.save_pretrained(tmp_path / "clip")
    tokenizer = tiny_tokenizer(with_image_token=False, with_pad_token=False)
    llm = LlamaForCausalLM(tiny_text_config(len(tokenizer), pad_token_id=None))
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    return tower, llm


@pytest.mark.parametrize("projector_type, grid", [("mbtf_stf", [4, 4, 1]), ("mlp2x_gelu", [8, 8, 1])])
def test_build_anyres_model_generates_saves_and_reloads(tmp_path, projector_type, grid):
    tower, llm = _save_towers(tmp_path)
    model, processor = build_model(
        str(tmp_path / "clip"), str(tmp_path / "llm"), projector_type, image_grid_pinpoints=TINY_PINPOINTS
    )
    assert isinstance(model, LlavaStfNextForConditionalGeneration) and isinstance(processor, LlavaStfNextProcessor)
    assert model.config.image_grid_pinpoints == TINY_PINPOINTS and processor.crop_grid == grid
    image_processor = processor.image_processor
    assert type(image_processor).__name__ == "LlavaNextImageProcessorPil"
    assert image_processor.image_grid_pinpoints == TINY_PINPOINTS and processor.image_aspect_ratio == "anyres"
    assert tuple(image_processor.image_mean) == MEAN and tuple(image_processor.image_std) == STD
    assert image_processor.size["shortest_edge"] == processor.crop_size == TINY_NEXT_CROP

    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert all(p.requires_grad for p in model.parameters())
    newline = model.model.image_newline
    assert newline.shape == (64,) and 0.06 < newline.std().item() < 0.2  # normal, std 1/sqrt(64) = 0.125
    assert torch.equal(
        model.model.vision_tower.encoder.layers[3].mlp.fc1.weight, tower.encoder.layers[3].mlp.fc1.weight
    )
    assert torch.equal(model.model.language_model.layers[1].mlp.up_proj.weight, llm.model.layers[1].mlp.up_proj.weight)

    image = make_image(seed=1, size=(90, 40))
    inputs = processor(images=[image], text=[PROMPT])
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == model.config.image_token_count(40, 90)
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 4

    model.save_pretrained(tmp_path / "out")
    processor.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert isinstance(reloaded, LlavaStfNextForConditionalGeneration)
    assert torch.equal(reloaded.model.image_newline, newline)
    again = reloaded_processor(images=[image], text=[PROMPT])
    assert torch.equal(again["input_ids"], inputs["input_ids"]) and torch.equal(
        again["pixel_values"], inputs["pixel_values"]
    )
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**again).logits, logits, rtol=0, atol=0)
        assert torch.equal(reloaded.generate(**again, max_new_tokens=4, do_sample=False), tokens)


def test_an_anyres_model_refuses_a_square_or_pad_image_mode(tmp_path):
    _save_towers(tmp_path)
    with pytest.raises(ValueError, match="image_aspect_ratio='pad' is for LLaVA-1.5 models"):
        build_model(
            str(tmp_path / "clip"), str(tmp_path / "llm"), "mbtf_stf", image_aspect_ratio="pad",
            image_grid_pinpoints=TINY_PINPOINTS,
        )  # fmt: skip
    with pytest.raises(ValueError, match="multiple of the vision crop size 56"):
        build_model(str(tmp_path / "clip"), str(tmp_path / "llm"), "mbtf_stf", image_grid_pinpoints=[[56, 100]])


def test_a_vision_reducer_budget_reaches_the_anyres_processor(tmp_path):
    """With VisionZip at 8 tokens per crop, the built processor writes crops x 8 placeholders, as the model gives."""
    _save_towers(tmp_path)
    model, processor = build_model(
        str(tmp_path / "clip"),
        str(tmp_path / "llm"),
        "mlp2x_gelu",
        reducer_type="visionzip",
        reducer_tokens=8,
        image_grid_pinpoints=TINY_PINPOINTS,
    )
    assert processor.reduced_crop_tokens == model.config.reduced_crop_tokens == 8
    image = make_image(seed=2, size=(112, 112))  # 4 tiles + the base image
    assert processor.image_token_count(112, 112) == model.config.image_token_count(112, 112) == 5 * 8
    with torch.no_grad():
        model.eval()(**processor(images=[image], text=PROMPT))  # placeholders == features, or the model raises
