"""The generation helper: prompts from the saved template, left padding, batch == single, streaming, loud errors."""

from __future__ import annotations

import pytest
import torch

from llava_stf.data.conversation import LLAVA_SYSTEM, VICUNA_SYSTEM, Turn
from llava_stf.generation import GenerationSettings, Generator, Request, load_checkpoint
from llava_stf.testing import make_image, tiny_config, tiny_model, tiny_processor, tiny_tokenizer

QUESTIONS = [
    "What is shown in the image?",
    "How many shapes are there? Answer the question using a single word or phrase.",
    "Is there a green star?",
    "Describe the image briefly, including the colors of every shape on the left and on the right.",
]


@pytest.fixture(scope="module")
def generator(checkpoint) -> Generator:
    return Generator.from_pretrained(checkpoint, device="cpu")


def _requests() -> list[Request]:
    requests = [Request.single(q, make_image(i, (30 + 7 * i, 44 - 3 * i))) for i, q in enumerate(QUESTIONS)]
    return [*requests, Request.single("Which number comes after two?")]  # text only


def test_load_checkpoint_gives_eval_model_and_processor(checkpoint) -> None:
    model, processor = load_checkpoint(checkpoint, device="cpu")
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert processor.num_image_tokens == model.config.num_image_tokens
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        load_checkpoint(checkpoint / "nope")


def test_prompt_uses_the_template_saved_with_the_processor() -> None:
    tokenizer = tiny_tokenizer()
    config = tiny_config(tokenizer, "mlp2x_gelu")
    model, processor = tiny_model(config), tiny_processor(config, tokenizer)
    request = Request.single("What is it?", make_image(0))
    prompt = Generator(model, processor).prompt(request)
    assert prompt == f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"
    processor.conversation_template = "llava_v1"
    assert Generator(model, processor).prompt(request).startswith(LLAVA_SYSTEM + " USER: <image>\n")
    processor.conversation_template = "plain"
    assert Generator(model, processor).prompt(request) == "<image>"


def test_template_survives_save_and_load(tmp_path) -> None:
    tokenizer = tiny_tokenizer()
    config = tiny_config(tokenizer, "mlp2x_gelu")
    tiny_model(config).save_pretrained(tmp_path)
    processor = tiny_processor(config, tokenizer)
    processor.conversation_template = "llava_v1"
    processor.save_pretrained(tmp_path)
    generator = Generator.from_pretrained(tmp_path, device="cpu")
    assert generator.prompt(Request.single("Hi?")).startswith(LLAVA_SYSTEM)


def test_encode_pads_on_the_left_with_a_mask(generator) -> None:
    requests = _requests()[:2]
    inputs = generator.encode(requests)
    single = [generator.encode([r])["input_ids"][0].tolist() for r in requests]
    width = inputs["input_ids"].shape[1]
    assert width == max(len(s) for s in single) and len(single[0]) != len(single[1])
    for row, ids in enumerate(single):
        pad = width - len(ids)
        assert inputs["input_ids"][row, pad:].tolist() == ids
        assert inputs["attention_mask"][row].tolist() == [0] * pad + [1] * len(ids)
    features = inputs["mm_encoder_outputs"]["image"].pooler_output  # images encoded once, before generation
    n_image = (inputs["input_ids"] == generator.model.config.image_token_id).sum(dim=1).tolist()
    assert n_image == [len(f) for f in features] == [generator.model.config.num_image_tokens] * 2


def test_batch_gives_the_same_answers_as_one_by_one(generator) -> None:
    settings = GenerationSettings(max_new_tokens=12)
    requests = _requests()
    one_by_one = [generator.generate([r], settings)[0] for r in requests]
    assert len(set(one_by_one)) > 1  # the images and questions matter, so a mix-up in the batch would show
    assert generator.generate(requests, settings) == one_by_one


def test_streaming_pieces_add_up_to_the_answers(generator) -> None:
    pieces: dict[int, list[str]] = {}
    answers = generator.generate(
        _requests()[:3],
        GenerationSettings(max_new_tokens=10),
        stream=lambda row, text: pieces.setdefault(row, []).append(text),
    )
    assert sorted(pieces) == [0, 1, 2]
    assert ["".join(pieces[row]).strip() for row in range(3)] == answers


def test_answers_stop_at_eos_and_skip_special_tokens(generator) -> None:
    tokenizer = generator.tokenizer
    ids = tokenizer.encode(" red circle", add_special_tokens=False)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert generator._decode([*ids, pad, eos, *tokenizer.encode(" blue", add_special_tokens=False)]) == "red circle"


def test_image_and_tag_must_agree(generator) -> None:
    with pytest.raises(ValueError, match="1 '<image>' tag"):
        generator.prompt(Request((Turn("human", "<image>\nWhat?"),), None))
    with pytest.raises(ValueError, match="0 '<image>' tag"):
        generator.prompt(Request((Turn("human", "What?"),), make_image(0)))


def test_processor_and_model_token_counts_must_agree() -> None:
    tokenizer = tiny_tokenizer()
    stf, mlp = tiny_config(tokenizer, "mbtf_stf"), tiny_config(tokenizer, "mlp2x_gelu")
    with pytest.raises(ValueError, match=f"processor: {mlp.num_image_tokens}, model: {stf.num_image_tokens}"):
        Generator(tiny_model(stf), tiny_processor(mlp, tokenizer))
