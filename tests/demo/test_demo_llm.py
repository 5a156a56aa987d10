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
