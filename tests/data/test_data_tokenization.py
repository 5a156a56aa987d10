"""Tokenization and label masking: golden layouts, upstream id parity, truncation, properties.

Upstream: haotian-liu/LLaVA ``llava/train/train.py`` (``preprocess_v1``, ``preprocess_plain``) and
``llava/mm_utils.py`` (``tokenizer_image_token``).

Tokenizers: the tiny byte-level BPE of ``llava_stf.testing`` and a SentencePiece BPE trained in memory, loaded as a
transformers ``LlamaTokenizer`` in three flavours (Metaspace ``first`` = ``legacy=False`` as vicuna-7b-v1.5,
Metaspace ``always`` = ``legacy=True``, and the old ``Prepend`` + ``Replace`` normalizer of converted tokenizer.json).
"""

from __future__ import annotations

import io

import pytest
import sentencepiece as spm
from hypothesis import event, given, settings
from hypothesis import strategies as st
from tokenizers import normalizers
from transformers import LlamaTokenizer

from llava_stf.data import tokenization
from llava_stf.data.conversation import GPT, HUMAN, Turn, get_template, normalize_record
from llava_stf.data.tokenization import (
    IGNORE_INDEX,
    NO_SUPERVISION,
    SPECIAL_TOKEN_IN_TEXT,
    ImageTokens,
    SkippedSample,
    TokenizationMismatchError,
    check_against_prompt,
    tokenize_conversation,
    tokenize_prompt,
)
from llava_stf.testing import IMAGE_TOKEN, make_image, tiny_config, tiny_processor, tiny_tokenizer

SYSTEM = get_template("vicuna_v1").system
N_IMG = 5
TURNS = normalize_record(
    {
        "image": "a.jpg",
        "conversations": [
            {"from": "human", "value": "What is shown?\n<image>"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Why  "},
            {"from": "gpt", "value": "Because\n it is."},
        ],
    }
)
SP_FLAVOURS = ("sp_first", "sp_always", "sp_prepend")
SP_CORPUS = [
    SYSTEM,
    "USER: What is shown in the image? ASSISTANT: A cat sitting next to a blue square.",
    "How many shapes are there? There are three: two circles and one square. Why? Because it is red!",
    "left right top bottom center large small red green blue yellow 0 1 2 3 4 5 6 7 8 9 (a) 'b' \"c\" -;:,.",
]


def sentencepiece_tokenizer(directory, flavour: str, corpus: list[str] = SP_CORPUS) -> LlamaTokenizer:
    """A Llama-style SentencePiece BPE tokenizer (byte fallback, <unk>=0 <s>=1 </s>=2) with ``<image>`` added."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buffer,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,  # Llama's trainer settings: bytes for unknown characters, digits split,
        split_digits=True,  # whitespace kept as is and allowed to form pieces of its own ("▁▁")
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        pad_id=-1,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(buffer.getvalue())
    tok = LlamaTokenizer.from_pretrained(directory, legacy=flavour != "sp_first", add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if flavour == "sp_prepend":
        tok.backend_tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        tok.backend_tokenizer.pre_tokenizer = None
    return tok


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, session_tokenizer):
    out = {"bbpe": session_tokenizer}
    for flavour in SP_FLAVOURS:
        out[flavour] = sentencepiece_tokenizer(tmp_path_factory.mktemp(flavour), flavour)
    return out


def spec(tok, n: int = N_IMG) -> ImageTokens:
    return ImageTokens(tok.convert_tokens_to_ids(IMAGE_TOKEN), n)


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def supervised_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive supervised positions, as id lists (checking labels equal ids there)."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + [current] if current else runs


# ------------------------------------------------------------------------------------------------ golden layouts
def test_vicuna_layout_matches_the_reference(session_tokenizer):
    tok, img = session_tokenizer, spec(session_tokenizer)
    out = tokenize_conversation(TURNS[:2], get_template("vicuna_v1"), tok, img)
    # upstream layout, one image turn: [BOS, "A chat ... USER: ", image x N, "\nWhat is shown? ASSISTANT: A cat.", EOS]
    head = [tok.bos_token_id] + enc(tok, SYSTEM + " USER: ") + [img.image_token_id] * N_IMG
    tail = enc(tok, "\nWhat is shown? ASSISTANT: A cat.") + [tok.eos_token_id]
    assert out.input_ids == head + tail
    answer = enc(tok, " A cat.") + [tok.eos_token_id]  # the space after "ASSISTANT:" belongs to the answer
    assert out.labels == [IGNORE_INDEX] * (len(out.input_ids) - len(answer)) + answer
    assert tok.decode(answer) == " A cat.</s>"
    assert not out.truncated


def test_plain_layout_is_image_then_caption_and_newline_without_eos(session_tokenizer):
    tok, img = session_tokenizer, spec(session_tokenizer)
    turns = (Turn(HUMAN, "<image>\nSummarize the photo."), Turn(GPT, "a red circle"))
    out = tokenize_conversation(turns, get_template("plain"), tok, img)
    caption = enc(tok, "a red circle\n")
    assert out.input_ids == [tok.bos_token_id] + [img.image_token_id] * N_IMG + caption
    assert out.labels == [IGNORE_INDEX] * (1 + N_IMG) + caption
    assert tok.eos_token_id not in out.input_ids


def test_every_answer_ends_with_a_supervised_eos(session_tokenizer):
    out = tokenize_conversation(TURNS, get_template("vicuna_v1"), session_tokenizer, spec(session_tokenizer))
    runs = supervised_runs(out.input_ids, out.labels)
    assert [session_tokenizer.decode(r) for r in runs] == [" A cat.</s>", " Because\n it is.</s>"]
    assert out.input_ids.count(session_tokenizer.eos_token_id) == 2


def test_text_only_sample_has_no_image_positions(session_tokenizer):
    turns = normalize_record({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]})
    template, image_id = get_template("vicuna_v1"), spec(session_tokenizer).image_token_id
    for image in (None, spec(session_tokenizer)):
        out = tokenize_conversation(turns, template, session_tokenizer, image)
        assert image_id not in out.input_ids
        assert out.input_ids == [session_tokenizer.bos_token_id] + enc(session_tokenizer, template.render(turns))
        assert session_tokenizer.decode(supervised_runs(out.input_ids, out.labels)[0]) == " Yo</s>"


@pytest.mark.parametrize("name", ("bbpe",) + SP_FLAVOURS)
def test_processor_is_an_image_spec_and_tokenizes_the_prompt_the_same_way(tokenizers, name):
    tok = tokenizers[name]
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    processor = tiny_processor(tiny_config(tok), tok)
    template = get_template("vicuna_v1")
    prompt = template.prompt(TURNS[:1])
    out = tokenize_conversation(TURNS[:2], template, tok, processor)
    from_processor = processor(images=make_image(), text=prompt)["input_ids"][0].tolist()
    assert from_processor == tokenize_prompt(prompt, tok, processor) == out.input_ids[: len(from_processor)]
    assert from_processor.count(processor.image_token_id) == processor.num_image_tokens


def test_image_tag_without_an_image_spec_fails(session_tokenizer):
    with pytest.raises(ValueError, match="no image token spec"):
        tokenize_conversation(TURNS, get_template("vicuna_v1"), session_tokenizer, image=None)


def test_special_token_spelled_in_a_message_is_a_counted_skip(session_tokenizer):
    turns = (Turn(HUMAN, "Hi"), Turn(GPT, "Bye</s> and more"))
    with pytest.raises(SkippedSample) as info:
        tokenize_conversation(turns, get_template("vicuna_v1"), session_tokenizer)
    assert info.value.reason == SPECIAL_TOKEN_IN_TEXT


def test_conversation_without_an_answer_is_a_counted_skip(session_tokenizer):
    with pytest.raises(SkippedSample) as info:
        tokenize_conversation((Turn(HUMAN, "Hi"),), get_template("vicuna_v1"), session_tokenizer)
    assert info.value.reason == NO_SUPERVISION


# ------------------------------------------------------------------------------- upstream parity and the check
@pytest.mark.parametrize("name", ("bbpe",) + SP_FLAVOURS)
@pytest.mark.parametrize("template_name", ["vicuna_v1", "plain"])
def test_pieces_equal_upstream_chunk_tokenization(tokenizers, name, template_name):
    tok, template = tokenizers[name], get_template(template_name)
    turns = TURNS if template_name == "vicuna_v1" else TURNS[:2]
    out = tokenize_conversation(turns, template, tok, spec(tok), verify=True)
    assert out.input_ids == tokenize_prompt(template.render(turns), tok, spec(tok))
    assert out.input_ids[0] == tok.bos_token_id == 1


def test_sentencepiece_word_initial_markers(tokenizers):
    template = get_template("vicuna_v1")
    first = tokenizers["sp_first"]
    tokens = first.convert_ids_to_tokens(tokenize_conversation(TURNS, template, first, spec(first)).input_ids)
    after_image = tokens.index(IMAGE_TOKEN) + N_IMG
    assert tokens[after_image : after_image + 2] == ["▁", "<0x0A>"]  # fresh chunk after the image, as upstream
    assert not tokens[tokens.index("</s>") + 1].startswith("▁")  # legacy=False: no marker after </s>
    always = tokenizers["sp_always"]
    tokens = always.convert_ids_to_tokens(tokenize_conversation(TURNS, template, always, spec(always)).input_ids)
    assert tokens[tokens.index("</s>") + 1] == "▁"  # legacy=True: a marker after </s>, as that tokenizer does
    out = tokenize_conversation(TURNS, template, first, spec(first))
    answer = first.convert_ids_to_tokens(supervised_runs(out.input_ids, out.labels)[0])
    assert answer[0].startswith("▁") and answer[-1] == "</s>"
    assert first.decode([first.bos_token_id] + supervised_runs(out.input_ids, out.labels)[0]) == "<s> A cat.</s>"


def test_sentencepiece_ids_decode_to_the_render_except_the_fresh_marker(tokenizers):
    tok, template = tokenizers["sp_first"], get_template("vicuna_v1")
    out = tokenize_conversation(TURNS, template, tok, spec(tok))
    # every chunk is a fresh text, so its "▁" decodes as one space: after BOS (usual Llama) and after the image
    expected = " " + template.render(TURNS).replace(IMAGE_TOKEN, IMAGE_TOKEN * N_IMG + " ")
    assert tok.decode(out.input_ids) == "<s>" + expected


def test_space_runs_at_a_cut_may_segment_differently_but_spell_the_same_text(tmp_path):
    # Llama's vocabulary has "▁▁"; in "Why▁▁ASSISTANT" the whole string merges "▁▁", the pieces give "▁" + "▁A..."
    tok = sentencepiece_tokenizer(tmp_path, "sp_first", corpus=[line.replace(" ", "  ") for line in SP_CORPUS])
    assert "▁▁" in tok.get_vocab()
    turns, template = (Turn(HUMAN, "Why "), Turn(GPT, "So.")), get_template("vicuna_v1")
    out = tokenize_conversation(turns, template, tok, verify=True)  # the check passes: same text
    assert out.input_ids != tokenize_prompt(template.render(turns), tok)
    assert tok.decode(out.input_ids) == tok.decode(tokenize_prompt(template.render(turns), tok))


def test_check_accepts_another_segmentation_of_the_same_text(session_tokenizer):
    tok, template = session_tokenizer, get_template("vicuna_v1")
    ids = tokenize_conversation(TURNS[:2], template, tok, spec(tok)).input_ids
    answer = enc(tok, " A cat.")
    start = len(ids) - 1 - len(answer)
    bytewise = tok.convert_tokens_to_ids(["Ġ", "A", "Ġ", "c", "a", "t", "."])
    assert bytewise != answer and tok.decode(bytewise) == " A cat."
    check_against_prompt(ids[:start] + bytewise + ids[-1:], template.render(TURNS[:2]), tok, spec(tok))


@pytest.mark.parametrize("corrupt", ["drop", "extra_space", "image_count"])
def test_check_rejects_ids_that_spell_another_text(session_tokenizer, corrupt):
    tok, template, img = session_tokenizer, get_template("vicuna_v1"), spec(session_tokenizer)
    ids = tokenize_conversation(TURNS, template, tok, img).input_ids
    if corrupt == "drop":
        ids = ids[:-3] + ids[-2:]
    elif corrupt == "extra_space":
        ids = ids[:-2] + enc(tok, " ") + ids[-2:]
    else:
        ids = [img.image_token_id] + ids
    with pytest.raises(TokenizationMismatchError, match="first difference"):
        check_against_prompt(ids, template.render(TURNS), tok, img)


# ---------------------------------------------------------------------------------------------------- truncation
def full(tok) -> list[int]:
    return tokenize_conversation(TURNS, get_template("vicuna_v1"), tok, spec(tok)).input_ids


def test_truncation_drops_whole_trailing_rounds(session_tokenizer):
    tok = session_tokenizer
    ids = full(tok)
    first_round_end = ids.index(tok.eos_token_id) + 1
    out = tokenize_conversation(TURNS, get_template("vicuna_v1"), tok, spec(tok), max_length=len(ids) - 1)
    assert out.input_ids == ids[:first_round_end] and out.input_ids[-1] == out.labels[-1] == tok.eos_token_id
    assert out.num_truncated_tokens == len(ids) - first_round_end and out.truncated


def test_truncation_cuts_the_first_answer_tail_when_no_round_fits(session_tokenizer):
    tok = session_tokenizer
    ids, answer_start = full(tok), full(tok).index(tok.eos_token_id) - len(enc(tok, " A cat."))
    out = tokenize_conversation(TURNS, get_template("vicuna_v1"), tok, spec(tok), max_length=answer_start + 2)
    assert out.input_ids == ids[: answer_start + 2]
    assert out.labels[answer_start:] == ids[answer_start : answer_start + 2]  # still trained, without EOS


@pytest.mark.parametrize("where", ["inside_image", "after_image", "right_before_answer"])
def test_truncation_never_cuts_the_image_and_skips_samples_without_supervision(session_tokenizer, where):
    tok = session_tokenizer
    ids, image_id = full(tok), spec(tok).image_token_id
    image_start = ids.index(image_id)
    answer_start = ids.index(tok.eos_token_id) - len(enc(tok, " A cat."))
    cuts = {"inside_image": image_start + 2, "after_image": image_start + N_IMG, "right_before_answer": answer_start}
    max_length = cuts[where]
    with pytest.raises(SkippedSample) as info:
        tokenize_conversation(TURNS, get_template("vicuna_v1"), tok, spec(tok), max_length=max_length)
    assert info.value.reason == NO_SUPERVISION
    out = tokenize_conversation(TURNS, get_template("vicuna_v1"), tok, spec(tok), max_length=answer_start + 1)
    assert out.input_ids.count(image_id) == N_IMG and out.labels[-1] == out.input_ids[-1] != IGNORE_INDEX


def test_truncation_never_splits_an_image_span_even_inside_an_answer(session_tokenizer):
    tok, img = session_tokenizer, spec(session_tokenizer)
    turns = (Turn(HUMAN, "Q"), Turn(GPT, "see <image> here"))  # not a valid record; tokenization must still hold
    ids = tokenize_conversation(turns, get_template("vicuna_v1"), tok, img).input_ids
    image_start = ids.index(img.image_token_id)
    out = tokenize_conversation(turns, get_template("vicuna_v1"), tok, img, max_length=image_start + 2)
    assert out.input_ids == ids[:image_start] and out.labels[-1] == ids[image_start - 1]


# ---------------------------------------------------------------------------------------------------- properties
SAFE_TEXT = st.text(alphabet="abcXYZ019 \n\t.,?!:;'\"-()", max_size=24)
CONVERSATIONS = st.tuples(
    st.lists(st.tuples(SAFE_TEXT, SAFE_TEXT), min_size=1, max_size=4),
    st.booleans(),  # with an image
    st.sampled_from(["vicuna_v1", "llava_v1"]),
    st.sampled_from([1, 3, 8]),  # image tokens
)


def build(rounds, with_image: bool) -> tuple[Turn, ...]:
    messages = []
    for k, (question, answer) in enumerate(rounds):
        tag = "<image>" if with_image and k == 0 else ""
        messages += [{"from": "human", "value": question + tag}, {"from": "gpt", "value": answer}]
    return normalize_record({"image": "x.jpg" if with_image else None, "conversations": messages})


@settings(max_examples=60, deadline=None)
@given(CONVERSATIONS)
def test_property_labels_are_exactly_the_answers_and_ids_spell_the_render(session_tokenizer, case):
    rounds, with_image, template_name, n_img = case
    tok, template, img = session_tokenizer, get_template(template_name), spec(session_tokenizer, n_img)
    turns = build(rounds, with_image)
    out = tokenize_conversation(turns, template, tok, img)
    rendered = template.render(turns)
    assert len(out.input_ids) == len(out.labels)
    assert out.input_ids == tokenize_prompt(rendered, tok, img)
    assert tok.decode(out.input_ids) == "<s>" + rendered.replace(IMAGE_TOKEN, IMAGE_TOKEN * n_img)
    runs = [tok.decode(r) for r in supervised_runs(out.input_ids, out.labels)]
    assert runs == [" " + t.text + "</s>" for t in turns if t.role == GPT]  # " " = separator merged into answer
    assert out.input_ids.count(img.image_token_id) == (n_img if with_image else 0)
    assert all(lab == IGNORE_INDEX for t, lab in zip(out.input_ids, out.labels) if t == img.image_token_id)
    prompt_ids = tokenize_prompt(template.prompt(turns[:-1]), tok, img)  # what generation sees before the answer
    assert out.input_ids[: len(prompt_ids)] == prompt_ids and out.labels[len(prompt_ids)] != IGNORE_INDEX


@settings(max_examples=60, deadline=None)
@given(CONVERSATIONS, st.data())
def test_property_truncation_keeps_a_correct_prefix(session_tokenizer, case, data):
    rounds, with_image, template_name, n_img = case
    tok, template, img = session_tokenizer, get_template(template_name), spec(session_tokenizer, n_img)
    turns = build(rounds, with_image)
    whole = tokenize_conversation(turns, template, tok, img)
    first_supervised = next(i for i, lab in enumerate(whole.labels) if lab != IGNORE_INDEX)
    lowest = data.draw(st.sampled_from([1, max(1, first_supervised - 2)]))  # half the cases near the answers
    max_length = data.draw(st.integers(min_value=lowest, max_value=len(whole.input_ids) + 2), label="max_length")
    try:
        out = tokenize_conversation(turns, template, tok, img, max_length=max_length)
    except SkippedSample as skip:
        event("skipped")
        assert skip.reason == NO_SUPERVISION and first_supervised >= max_length
        return
    n = len(out.input_ids)
    assert n <= max_length and n + out.num_truncated_tokens == len(whole.input_ids)
    assert out.input_ids == whole.input_ids[:n] and out.labels == whole.labels[:n]
    assert out.input_ids.count(img.image_token_id) == (n_img if with_image else 0)  # the image span is whole
    event("truncated" if out.truncated else "fits")
    if out.truncated:  # cut right after an answer's EOS, or through the first answer at exactly max_length
        assert out.input_ids[-1] == tok.eos_token_id or (n == max_length and tok.eos_token_id not in out.input_ids)


@settings(max_examples=25, deadline=None)
@given(CONVERSATIONS)
def test_property_sentencepiece_pieces_spell_the_render(tokenizers, case):
    rounds, with_image, template_name, n_img = case
    tok, template = tokenizers["sp_first"], get_template(template_name)
    turns = build(rounds, with_image)
    out = tokenize_conversation(turns, template, tok, spec(tok, n_img), verify=True)  # raises on a mismatch
    runs = [tok.decode([tok.bos_token_id] + r) for r in supervised_runs(out.input_ids, out.labels)]
    assert runs == ["<s> " + t.text + "</s>" for t in turns if t.role == GPT]


# ------------------------------------------------------------------------------------------------ the encode memo
def test_encode_memo_asks_the_tokenizer_once_per_text_and_follows_added_tokens(monkeypatch):
    tok = tiny_tokenizer()
    real, calls = tok.encode, []
    monkeypatch.setattr(tok, "encode", lambda text, **kw: calls.append(text) or real(text, **kw))
    first = tokenization.encode(tok, " ASSISTANT: a red circle")
    assert first == real(" ASSISTANT: a red circle", add_special_tokens=False)
    first.append(-1)  # the caller's copy: the memo keeps its own
    assert tokenization.encode(tok, " ASSISTANT: a red circle") == first[:-1] and len(calls) == 1
    tok.add_tokens(["redcircle"])  # a new vocabulary may encode the same text differently
    assert tokenization.encode(tok, " ASSISTANT: a red circle") == first[:-1] and len(calls) == 2
    monkeypatch.setattr(tokenization, "MEMO_ENTRIES", 0)
    tokenization.encode(tok, " ASSISTANT: a red circle")
    assert len(calls) == 3


@pytest.mark.parametrize("name", ("bbpe",) + SP_FLAVOURS)
def test_encode_memo_changes_no_id(tokenizers, name, monkeypatch):
    tok, template = tokenizers[name], get_template("vicuna_v1")
    remembered = [tokenize_conversation(TURNS, template, tok, spec(tok)) for _ in range(2)]
    monkeypatch.setattr(tokenization, "MEMO_ENTRIES", 0)
    fresh = tokenize_conversation(TURNS, template, tok, spec(tok))
    assert remembered[0] == remembered[1] == fresh


def test_encode_without_a_memo_for_an_unhashable_tokenizer():
    class Unhashable:  # defines __eq__ only: instances cannot be dictionary keys
        def __init__(self, tok):
            self.tok = tok

        def __eq__(self, other):
            return self is other

        def __len__(self):
            return len(self.tok)

        def encode(self, text, **kw):
            return self.tok.encode(text, **kw)

    tok = tiny_tokenizer()
    assert tokenization.encode(Unhashable(tok), " USER: hi") == tok.encode(" USER: hi", add_special_tokens=False)
