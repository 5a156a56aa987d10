"""ChatSession: multi-turn history from the saved template, no special tokens in it, streaming, context limit."""

from __future__ import annotations

import pytest
import torch

from llava_stf.data.conversation import GPT, HUMAN, Turn, get_template
from llava_stf.generation import GenerationSettings, Generator, Request
from llava_stf.serve.chat import ChatError, ChatSession
from llava_stf.testing import make_image, tiny_config, tiny_model, tiny_processor, tiny_tokenizer

SETTINGS = GenerationSettings(max_new_tokens=10)


@pytest.fixture(scope="module")
def generator(serve_checkpoint) -> Generator:
    return Generator.from_pretrained(serve_checkpoint, device="cpu")


def test_turns_follow_the_saved_template_and_the_image_goes_first(generator) -> None:
    image = make_image(3)
    session = ChatSession(generator, image, SETTINGS)
    first = session.ask("What is shown?")
    second = session.ask("What color is it?")
    expected = [Turn(HUMAN, "<image>\nWhat is shown?"), Turn(GPT, first), Turn(HUMAN, "What color is it?")]
    assert session.last_prompt == get_template("vicuna_v1").prompt(expected)
    assert session.turns == [*expected, Turn(GPT, second)]
    # The same helper as evaluation: the chat's answers are the generator's greedy answers to the same requests.
    assert generator.generate([Request(tuple(expected[:1]), image)], SETTINGS) == [first]
    assert generator.generate([Request(tuple(expected), image)], SETTINGS) == [second]
    assert first != second


def test_special_tokens_never_reach_the_history(generator, monkeypatch) -> None:
    """LLaVA's CLI kept the generated '</s>' in its history; here the answer is cut at EOS and decoded clean."""
    tokenizer = generator.tokenizer
    words = tokenizer.encode(" red circle", add_special_tokens=False)
    specials = [tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<image>"), tokenizer.unk_token_id]
    generated = [words[0], *specials, *words[1:], tokenizer.eos_token_id, *words]

    def fake_generate(input_ids, **kwargs):
        return torch.cat([input_ids, torch.tensor([generated])], dim=1)

    monkeypatch.setattr(generator.model, "generate", fake_generate)
    session = ChatSession(generator, make_image(0), SETTINGS)
    assert session.ask("What is it?") == "red circle"
    session.ask("And then?")
    prompt = session.last_prompt
    assert prompt.endswith(" ASSISTANT: red circle</s>USER: And then? ASSISTANT:")
    assert prompt.count("</s>") == 1 and prompt.count("<image>") == 1 and "<pad>" not in prompt
    assert all(s not in turn.text for turn in session.turns for s in ("</s>", "<pad>", "<unk>", "<s>"))


def test_special_token_strings_typed_by_the_user_are_removed(generator) -> None:
    session = ChatSession(generator, make_image(0), SETTINGS)
    assert session.clean("  is it <image> red</s>? <pad> ") == ("is it  red?", ["<image>", "<pad>", "</s>"])
    assert session.clean("plain <b>html</b>") == ("plain <b>html</b>", [])


def test_streaming_arrives_while_generating_and_adds_up_to_the_greedy_answer(generator) -> None:
    forwards = []
    hook = generator.model.register_forward_hook(lambda *_: forwards.append(1))
    pieces: list[tuple[int, str]] = []  # (forward passes done when the piece arrived, text)
    try:
        session = ChatSession(generator, make_image(5), SETTINGS)
        streamed = session.ask("Describe the image.", stream=lambda text: pieces.append((len(forwards), text)))
    finally:
        hook.remove()
    plain = ChatSession(generator, make_image(5), SETTINGS).ask("Describe the image.")
    assert "".join(text for _, text in pieces).strip() == streamed == plain != ""
    assert len(pieces) >= 3 and pieces[0][0] < len(forwards)  # incremental: pieces came before the last step


def test_a_question_over_the_context_is_refused_and_the_history_kept(generator, monkeypatch) -> None:
    session = ChatSession(generator, make_image(0), SETTINGS)
    session.ask("What is shown?")
    history = list(session.turns)
    request = session.request("Tell me more.")
    length = len(generator.processor.encode_prompt(generator.prompt(request)))
    monkeypatch.setattr(session, "context_length", length + SETTINGS.max_new_tokens - 1)
    with pytest.raises(ChatError, match=f"{length} prompt tokens \\+ up to 10 new ones, over the model's context"):
        session.ask("Tell me more.")
    assert session.turns == history
    session.context_length = length + SETTINGS.max_new_tokens  # exactly fits
    session.ask("Tell me more.")
    assert len(session.turns) == 4
    assert ChatSession(generator).context_length == generator.model.config.text_config.max_position_embeddings


def test_a_plain_template_checkpoint_captions_every_question_afresh() -> None:
    tokenizer = tiny_tokenizer()
    config = tiny_config(tokenizer, "mlp2x_gelu")
    processor = tiny_processor(config, tokenizer)
    processor.conversation_template = "plain"  # what a stage-1 checkpoint saves
    generator = Generator(tiny_model(config), processor)
    session = ChatSession(generator, make_image(1), SETTINGS)
    first, second = session.ask("What is it?"), session.ask("Anything else?")
    assert first == second and session.turns == [] and session.last_prompt == "<image>"
    with pytest.raises(ChatError, match="'plain'.*needs an image"):
        ChatSession(generator, None, SETTINGS)


def test_text_only_chat_has_no_image_tag(generator) -> None:
    session = ChatSession(generator, None, SETTINGS)
    session.ask("Which number comes after two?")
    assert "<image>" not in session.last_prompt and session.last_prompt.endswith("two? ASSISTANT:")
