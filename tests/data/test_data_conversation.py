"""Conversation templates and LLaVA JSON normalisation.

Golden strings and rules from haotian-liu/LLaVA ``llava/conversation.py`` and ``llava/train/train.py``.
"""

from __future__ import annotations

import dataclasses

import pytest

from llava_stf.data.conversation import (
    GPT,
    HUMAN,
    TEMPLATES,
    Turn,
    get_template,
    normalize_record,
    place_image_first,
)

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
ONE_TURN = (Turn(HUMAN, "<image>\nWhat is shown?"), Turn(GPT, "A cat."))
TWO_TURNS = ONE_TURN + (Turn(HUMAN, "Why?"), Turn(GPT, "Because it purrs."))


def record(*values: str, image: str | None = "coco/1.jpg", first: str = HUMAN) -> dict:
    roles = [first, GPT if first == HUMAN else HUMAN]
    return {
        "id": "s1",
        "image": image,
        "conversations": [{"from": roles[i % 2], "value": v} for i, v in enumerate(values)],
    }


# ------------------------------------------------------------------------------------------------ golden strings
def test_vicuna_training_string_one_image_turn():
    expected = SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT: A cat.</s>"
    assert get_template("vicuna_v1").render(ONE_TURN) == expected


def test_vicuna_multi_turn_continues_right_after_eos():
    expected = (
        SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT: A cat.</s>USER: Why? ASSISTANT: Because it purrs.</s>"
    )
    assert get_template("vicuna_v1").render(TWO_TURNS) == expected


def test_vicuna_inference_prompt_has_no_trailing_space():
    question = "What is shown?\nAnswer the question using a single word or phrase."
    prompt = get_template("vicuna_v1").prompt([Turn(HUMAN, "<image>\n" + question)])
    assert prompt == SYSTEM + " USER: <image>\n" + question + " ASSISTANT:"


def test_vicuna_multi_turn_inference_prompt():
    prompt = get_template("vicuna_v1").prompt(TWO_TURNS[:3])
    assert prompt == SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT: A cat.</s>USER: Why? ASSISTANT:"


def test_vicuna_trailing_user_turn_follows_upstream_rule():
    # upstream: role + ": " + text + " " for a user turn, even when it is the last one
    assert get_template("vicuna_v1").render(TWO_TURNS[:3]).endswith("A cat.</s>USER: Why? ")


def test_llava_v1_differs_only_in_system_text():
    vicuna, llava = get_template("vicuna_v1"), get_template("llava_v1")
    assert llava.render(TWO_TURNS) == vicuna.render(TWO_TURNS).replace(SYSTEM, LLAVA_V1_SYSTEM, 1)
    assert llava.render(TWO_TURNS).startswith(LLAVA_V1_SYSTEM + " USER: ")


def test_plain_training_string_discards_the_human_text():
    turns = (Turn(HUMAN, "<image>\nRender a clear and concise summary of the photo."), Turn(GPT, "a red bus"))
    assert get_template("plain").render(turns) == "<image>a red bus\n"


def test_plain_prompt_is_the_image_alone():
    assert get_template("plain").prompt([Turn(HUMAN, "<image>\nDescribe.")]) == "<image>"


@pytest.mark.parametrize(
    "turns, match",
    [
        ((Turn(HUMAN, "no tag"), Turn(GPT, "x")), "needs '<image>'"),
        (TWO_TURNS, "exactly 2 turn"),
        (ONE_TURN[:1], "exactly 2 turn"),
    ],
)
def test_plain_rejects_what_upstream_asserts(turns, match):
    with pytest.raises(ValueError, match=match):
        get_template("plain").render(turns)


def test_spans_concatenate_to_render_and_mark_exactly_the_answers():
    template = get_template("vicuna_v1")
    spans = template.spans(TWO_TURNS)
    assert "".join(s.text for s in spans) == template.render(TWO_TURNS)
    assert [s.text for s in spans if s.supervised] == [" A cat.", "</s>", " Because it purrs.", "</s>"]
    assert [s.special for s in spans if s.supervised] == [False, True, False, True]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_reject_broken_alternation(name):
    with pytest.raises(ValueError, match="alternate"):
        get_template(name).render([Turn(GPT, "hi"), Turn(HUMAN, "<image>")])
    with pytest.raises(ValueError, match="at least one turn"):
        get_template(name).render([])


def test_prompt_must_end_with_a_human_turn():
    with pytest.raises(ValueError, match="end with a human turn"):
        get_template("vicuna_v1").prompt(ONE_TURN)


# ---------------------------------------------------------------------------------------------------- registry
def test_unknown_template_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"valid templates: \['llava_v1', 'plain', 'vicuna_v1'\]"):
        get_template("vicuna")


def test_templates_are_frozen_and_the_registry_is_read_only():
    assert set(TEMPLATES) == {"vicuna_v1", "llava_v1", "plain"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_template("vicuna_v1").system = "changed"
    with pytest.raises(TypeError):
        TEMPLATES["vicuna_v1"] = get_template("plain")


# ------------------------------------------------------------------------------------------------ normalisation
@pytest.mark.parametrize(
    "value, expected",
    [
        ("<image>\nWhat is this?", "<image>\nWhat is this?"),
        ("What is this?\n<image>", "<image>\nWhat is this?"),
        ("  What is <image> this?  ", "<image>\nWhat is  this?"),
        ("<image>", "<image>"),
        ("<image> two <image> tags", "<image>\ntwo  tags"),
    ],
)
def test_image_tag_moves_to_the_front_of_its_turn(value, expected):
    assert place_image_first(value) == expected
    assert normalize_record(record(value, "ok"))[0].text == expected


def test_leading_gpt_turn_is_dropped_and_other_turns_kept_byte_for_byte():
    turns = normalize_record(record("stray", "<image>\nQ? ", " answer \n", image="a.jpg", first=GPT))
    assert turns == (Turn(HUMAN, "<image>\nQ?"), Turn(GPT, " answer \n"))


def test_text_only_record_is_left_unchanged():
    turns = normalize_record(record("  Hi there ", "Hello!", image=None))
    assert turns == (Turn(HUMAN, "  Hi there "), Turn(GPT, "Hello!"))
    assert normalize_record({k: v for k, v in record("Hi", "Hello").items() if k != "image"})[0].text == "Hi"


@pytest.mark.parametrize(
    "rec, match",
    [
        ({"id": "x", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, "alternate"),
        ({"id": "x", "conversations": [{"from": "user", "value": "a"}]}, "unknown role 'user'"),
        ({"id": "x", "conversations": [{"from": "gpt", "value": "a"}]}, "at least one turn"),
        (record("What?", "A cat."), "exactly its first turn"),
        (record("<image>\nQ", "A", "Q2 <image>", "B"), r"turns holding it: \[0, 2\]"),
        (record("Q", "<image> A"), r"turns holding it: \[1\]"),
        (record("<image>\nQ", "A", image=None), "has no image"),
    ],
)
def test_malformed_records_fail_loudly(rec, match):
    with pytest.raises(ValueError, match=match):
        normalize_record(rec)
