"""The demo's text pre-training of the tiny Llama: its corpus and that it actually lowers the loss."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from llava_stf.demo.llm import pretrain_text, world_documents
from llava_stf.testing import tiny_text_config, tiny_tokenizer


def _world(tmp_path):
    pretrain = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>"},
                                                     {"from": "gpt", "value": "There is a red circle."}]}]  # fmt: skip
    instruct = [
        {
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}],
        },  # fmt: skip
        {"conversations": [{"from": "human", "value": "One plus one?"}, {"from": "gpt", "value": "Two."}]},
    ]
    (tmp_path / "pretrain.json").write_text(json.dumps(pretrain))
    (tmp_path / "instruct.json").write_text(json.dumps(instruct))
    return tmp_path


def test_world_documents_put_the_scene_caption_before_its_questions(tmp_path) -> None:
    docs = world_documents(_world(tmp_path) / "pretrain.json", tmp_path / "instruct.json")
    assert docs == ["There is a red circle.", "There is a red circle.\nWhat color?\nred", "One plus one?\nTwo."]
    assert not any("<image>" in d for d in docs)


def test_pretrain_text_lowers_the_loss_and_rejects_an_empty_corpus() -> None:
    texts = ["There is a red circle at the top.", "There is a blue square at the left."] * 4
    tokenizer = tiny_tokenizer(300, corpus=texts, with_image_token=False, with_pad_token=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_text_config(len(tokenizer), hidden_size=32, intermediate_size=64, pad_token_id=None))
    ids = torch.tensor([tokenizer(texts[0])["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids).loss.item()
    pretrain_text(model, tokenizer, texts, steps=60, lr=3e-3, batch_size=4)
    with torch.no_grad():
        after = model(input_ids=ids, labels=ids).loss.item()
    assert after < 0.6 * before
    with pytest.raises(ValueError, match="no texts"):
        pretrain_text(model, tokenizer, [], steps=1, lr=1e-3)


def test_pretrain_text_cuts_each_document_at_max_tokens() -> None:
    """A world of one's own may hold long multi-turn records: pre-training reads each one's first ``max_tokens``
    (the stages' ``model_max_length``), so no step is as long as the longest record."""
    texts = ["red circle " * 100, "blue square"]
    tokenizer = tiny_tokenizer(300, corpus=texts, with_image_token=False, with_pad_token=False)
    model = LlamaForCausalLM(tiny_text_config(len(tokenizer), hidden_size=32, intermediate_size=64, pad_token_id=None))
    widths: list[int] = []
    model.register_forward_pre_hook(lambda _m, _a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    pretrain_text(model, tokenizer, texts, steps=2, lr=1e-3, batch_size=2, max_tokens=24)
    assert widths == [24, 24]
    pretrain_text(model, tokenizer, texts, steps=1, lr=1e-3, batch_size=2)
    assert widths[-1] > 100


def test_prepare_llm_draws_the_output_layer_at_its_own_std(tmp_path) -> None:
    """The demo's LLM starts its output layer at ``llm_head_std`` (0.05; transformers' Llama init gives every matrix
    std 0.02, which stalls stage 2's lookups); everything else keeps transformers' init."""
    from llava_stf.demo.pipeline import DemoSettings, prepare_data, prepare_llm
    from llava_stf.demo.world import generated_world

    s = DemoSettings(
        num_train=8, num_eval=2, image_size=32, llm="captions", llm_hidden=64, llm_pretrain_steps=0, vocab_size=400
    )
    assert s.llm_head_std == 0.05
    world = generated_world(prepare_data(tmp_path, s), s.image_size)
    model = LlamaForCausalLM.from_pretrained(prepare_llm(tmp_path, world, s))
    head, embed = model.lm_head.weight.std().item(), model.model.embed_tokens.weight.std().item()
    assert abs(head - 0.05) < 0.005 and abs(embed - 0.02) < 0.003, (head, embed)
