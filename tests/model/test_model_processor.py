"""``LlavaStfProcessor``: LLaVA-1.5 image modes, RGB conversion, ``<image>`` expansion and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from llava_stf.model import PROJECTORS, LlavaStfProcessor
from llava_stf.model.processing_llava_stf import expand_to_square
from llava_stf.testing import IMAGE_TOKEN, make_image, tiny_config, tiny_image_processor, tiny_processor

PAD_COLOR = (122, 116, 104)  # int(255 * CLIP mean), truncated as LLaVA does
NON_SQUARE_SIZES = [(48, 40), (30, 52), (41, 50), (50, 41), (7, 3), (1, 6)]


@pytest.fixture
def config(session_tokenizer):
    return tiny_config(session_tokenizer, "mbtf_stf")


def manual_pad(image: Image.Image, color=PAD_COLOR) -> Image.Image:
    """Independent ``pad``: numpy canvas of ``color``, image pasted at ((side-w)//2, (side-h)//2)."""
    pixels = np.asarray(image.convert("RGB"))
    h, w, _ = pixels.shape
    side = max(h, w)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = np.array(color, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = pixels
    return Image.fromarray(canvas, "RGB")


def clip_pixels(images) -> torch.Tensor:
    return tiny_image_processor()(images, return_tensors="pt")["pixel_values"]


# -------------------------------------------------------------------------------------------------- pad mode
def test_pad_color_is_the_truncated_clip_mean(session_tokenizer, config):
    processor = tiny_processor(config, session_tokenizer)
    assert processor.pad_color == PAD_COLOR
    assert processor.image_aspect_ratio == "pad"  # LLaVA-1.5 stage 2 / evaluation default


@pytest.mark.parametrize("size", NON_SQUARE_SIZES, ids=[f"{w}x{h}" for w, h in NON_SQUARE_SIZES])
def test_expand_to_square_centres_on_the_pad_colour(size):
    image = make_image(seed=3, size=size)
    width, height = size
    side = max(size)
    out = expand_to_square(image, PAD_COLOR)
    assert out.size == (side, side)
    assert out.mode == "RGB"
    got = np.asarray(out)
    offset = (side - min(size)) // 2
    original = np.asarray(image)
    if width > height:
        region = got[offset : offset + height, :]
        border = np.concatenate([got[:offset], got[offset + height :]])
    else:
        region = got[:, offset : offset + width]
        border = np.concatenate([got[:, :offset], got[:, offset + width :]], axis=1)
    np.testing.assert_array_equal(region, original)
    assert border.size == (side - min(size)) * side * 3
    assert (border.reshape(-1, 3) == np.array(PAD_COLOR)).all()
    np.testing.assert_array_equal(got, np.asarray(manual_pad(image)))


def test_expand_to_square_leaves_square_images_alone():
    image = make_image(seed=4, size=(20, 20))
    out = expand_to_square(image, PAD_COLOR)
    assert out.size == (20, 20)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(image))


@pytest.mark.parametrize("size", NON_SQUARE_SIZES[:4], ids=[f"{w}x{h}" for w, h in NON_SQUARE_SIZES[:4]])
def test_pad_mode_pixel_values_equal_manual_padding_then_clip(session_tokenizer, config, size):
    processor = tiny_processor(config, session_tokenizer, image_aspect_ratio="pad")
    image = make_image(seed=5, size=size)
    expected = clip_pixels([manual_pad(image)])
    torch.testing.assert_close(processor.preprocess_images(image), expected, rtol=0, atol=0)
    batch = processor(images=[image], text=f"{IMAGE_TOKEN} hi")
    torch.testing.assert_close(batch["pixel_values"], expected, rtol=0, atol=0)
    # Padding changes what the tower sees: plain CLIP crops the long side instead.
    assert not torch.allclose(batch["pixel_values"], clip_pixels([image]))


def test_pad_mode_keeps_the_whole_image(session_tokenizer):
    """A wide image: after padding and resizing nothing is cropped, so the top and bottom rows are the pad colour."""
    config = tiny_config(session_tokenizer, "mlp2x_gelu")
    processor = tiny_processor(config, session_tokenizer, image_aspect_ratio="pad")
    image = Image.new("RGB", (64, 16), (255, 255, 255))
    pixels = processor.preprocess_images(image)[0]  # [3, 32, 32]
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1)
    top_row = pixels[:, 0, :] * std + mean  # back to [0, 1]
    torch.testing.assert_close(top_row, (torch.tensor(PAD_COLOR, dtype=torch.float32) / 255).view(3, 1).expand(3, 32))
    middle_row = pixels[:, 16, :] * std + mean
    torch.testing.assert_close(middle_row, torch.ones(3, 32), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- square mode
@pytest.mark.parametrize("size", [(48, 40), (30, 52), (32, 32), (100, 100)])
def test_square_mode_is_plain_clip_processing(session_tokenizer, config, size):
    processor = tiny_processor(config, session_tokenizer, image_aspect_ratio="square")
    image = make_image(seed=6, size=size)
    expected = clip_pixels([image])
    assert expected.shape == (1, 3, 32, 32)
    torch.testing.assert_close(processor.preprocess_images([image]), expected, rtol=0, atol=0)
    batch = processor(images=image, text=f"{IMAGE_TOKEN} hi")
    torch.testing.assert_close(batch["pixel_values"], expected, rtol=0, atol=0)


def test_modes_agree_on_square_images(session_tokenizer, config):
    image = make_image(seed=7, size=(40, 40))
    pad = tiny_processor(config, session_tokenizer, "pad").preprocess_images(image)
    square = tiny_processor(config, session_tokenizer, "square").preprocess_images(image)
    torch.testing.assert_close(pad, square, rtol=0, atol=0)


def test_unknown_image_mode_is_rejected(session_tokenizer, config):
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        tiny_processor(config, session_tokenizer, image_aspect_ratio="anyres")


# ------------------------------------------------------------------------------------------------- image modes
@pytest.mark.parametrize("aspect", ["pad", "square"])
@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK", "1"])
def test_non_rgb_images_are_converted_to_rgb(session_tokenizer, config, aspect, mode):
    processor = tiny_processor(config, session_tokenizer, image_aspect_ratio=aspect)
    image = make_image(seed=8, size=(40, 28), mode=mode)
    assert image.mode == mode
    pixels = processor.preprocess_images(image)
    assert pixels.shape == (1, 3, 32, 32)
    assert pixels.dtype == torch.float32
    rgb = image.convert("RGB")
    expected = clip_pixels([manual_pad(rgb) if aspect == "pad" else rgb])
    torch.testing.assert_close(pixels, expected, rtol=0, atol=0)


def test_mixed_modes_in_one_batch(session_tokenizer, config):
    processor = tiny_processor(config, session_tokenizer)
    images = [make_image(1, (40, 28), "L"), make_image(2, (28, 40), "RGBA"), make_image(3, (30, 30), "P")]
    batch = processor(images=images, text=[f"{IMAGE_TOKEN} a", f"{IMAGE_TOKEN} b {IMAGE_TOKEN} c"])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    for i, image in enumerate(images):
        torch.testing.assert_close(batch["pixel_values"][i], clip_pixels([manual_pad(image.convert("RGB"))])[0])


# ----------------------------------------------------------------------------------------------- <image> expansion
def image_runs(ids: list[int], image_id: int) -> list[int]:
    """Lengths of the maximal runs of ``image_id``."""
    runs, current = [], 0
    for tok in ids:
        if tok == image_id:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    if current:
        runs.append(current)
    return runs


def collapse_runs(ids: list[int], image_id: int) -> list[int]:
    out = []
    for tok in ids:
        if not (tok == image_id and out and out[-1] == image_id):
            out.append(tok)
    return out


@pytest.mark.parametrize("name", list(PROJECTORS))
def test_each_image_tag_expands_to_num_image_tokens(session_tokenizer, image_token_id, name):
    config = tiny_config(session_tokenizer, name)
    n = config.num_image_tokens
    processor = tiny_processor(config, session_tokenizer)
    assert processor.num_image_tokens == n and processor.image_token_id == image_token_id
    texts = [f"USER: {IMAGE_TOKEN}\nWhat is this? and {IMAGE_TOKEN} ASSISTANT:", f"{IMAGE_TOKEN} Describe."]
    images = [make_image(i) for i in range(3)]
    batch = processor(images=images, text=texts)
    for row, text in enumerate(texts):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        expected_runs = [n] * text.count(IMAGE_TOKEN)
        assert image_runs(ids, image_token_id) == expected_runs
        # Outside the image spans the ids are the plain tokenization, <image> being one token.
        assert collapse_runs(ids, image_token_id) == session_tokenizer(text)["input_ids"]
    assert batch["pixel_values"].shape[0] == 3


def test_adjacent_image_tags_stay_separate_spans(session_tokenizer, config, image_token_id):
    processor = tiny_processor(config, session_tokenizer)
    batch = processor(images=[make_image(0), make_image(1)], text=f"{IMAGE_TOKEN}{IMAGE_TOKEN} two images")
    ids = batch["input_ids"][0].tolist()
    assert ids.count(image_token_id) == 2 * config.num_image_tokens
    assert session_tokenizer(f"{IMAGE_TOKEN}{IMAGE_TOKEN}")["input_ids"].count(image_token_id) == 2


def test_expand_image_tokens_on_ids(session_tokenizer, config, image_token_id):
    processor = tiny_processor(config, session_tokenizer)
    n = processor.num_image_tokens
    assert processor.expand_image_tokens([1, image_token_id, 7, image_token_id]) == (
        [1] + [image_token_id] * n + [7] + [image_token_id] * n
    )
    assert processor.expand_image_tokens([1, 7, 9]) == [1, 7, 9]


@pytest.mark.parametrize(
    ("texts", "n_images"),
    [
        (["<image> a"], 2),
        (["<image> a <image>"], 1),
        (["a", "b"], 1),
        (["<image> a"], 0),
        (["<image> a", "<image> b"], 3),
    ],
)
def test_tag_image_count_mismatch_raises(session_tokenizer, config, texts, n_images):
    processor = tiny_processor(config, session_tokenizer)
    images = [make_image(i) for i in range(n_images)] or None
    n_tags = sum(t.count(IMAGE_TOKEN) for t in texts)
    with pytest.raises(ValueError) as info:
        processor(images=images, text=texts)
    message = str(info.value)
    assert f"{n_tags} " in message and f"{n_images} image" in message


def test_text_is_required(session_tokenizer, config):
    processor = tiny_processor(config, session_tokenizer)
    with pytest.raises(ValueError, match="text"):
        processor(images=[make_image(0)])


def test_text_only_batch_has_no_pixel_values(session_tokenizer, config, image_token_id):
    processor = tiny_processor(config, session_tokenizer)
    batch = processor(text=["hello there", "hi"])
    assert "pixel_values" not in batch
    assert image_token_id not in batch["input_ids"].tolist()[0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_and_attention_mask(tokenizer, side):
    config = tiny_config(tokenizer, "mbtf_stf")
    tokenizer.padding_side = side
    processor = tiny_processor(config, tokenizer)
    texts = [f"{IMAGE_TOKEN} short", f"{IMAGE_TOKEN} a much longer question about the image with more words"]
    batch = processor(images=[make_image(0), make_image(1)], text=texts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.dtype == torch.long
    short_len = len(processor.expand_image_tokens(tokenizer(texts[0])["input_ids"]))
    pad = ids.shape[1] - short_len
    assert pad > 0 and mask[1].all()
    expected_mask = [0] * pad + [1] * short_len if side == "left" else [1] * short_len + [0] * pad
    assert mask[0].tolist() == expected_mask
    assert (ids[0][mask[0] == 0] == tokenizer.pad_token_id).all()


def test_invalid_num_image_tokens_rejected(session_tokenizer):
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="num_image_tokens"):
            LlavaStfProcessor(tiny_image_processor(), session_tokenizer, num_image_tokens=bad)


def test_conversation_template_is_saved_with_the_processor(tmp_path, session_tokenizer):
    from transformers import AutoProcessor

    processor = tiny_processor(tiny_config(session_tokenizer), session_tokenizer)
    assert processor.conversation_template == "vicuna_v1"
    processor.conversation_template = "plain"
    processor.save_pretrained(tmp_path)
    assert AutoProcessor.from_pretrained(tmp_path).conversation_template == "plain"
