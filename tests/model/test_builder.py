"""The builder assembles a model from separately saved vision-tower and LLM checkpoints (tiny, offline)."""

from __future__ import annotations

import torch
from transformers import AutoModelForImageTextToText, CLIPConfig, CLIPModel, CLIPTextConfig, LlamaForCausalLM

from llava_stf.model.builder import build_model
from llava_stf.model.reducers import TokenDropLlamaModel
from llava_stf.testing import make_image, tiny_image_processor, tiny_text_config, tiny_tokenizer, tiny_vision_config


def _save_towers(tmp_path):
    """A full CLIP checkpoint (text + vision, like openai/clip-*) and a Llama whose tokenizer lacks <image> and pad."""
    clip = CLIPModel(
        CLIPConfig(
            text_config=CLIPTextConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99
            ).to_dict(),
            vision_config=tiny_vision_config().to_dict(),
            projection_dim=32,
        )
    )
    clip.save_pretrained(tmp_path / "clip")
    tiny_image_processor().save_pretrained(tmp_path / "clip")
    tokenizer = tiny_tokenizer(with_image_token=False, with_pad_token=False)
    llm = LlamaForCausalLM(tiny_text_config(len(tokenizer), pad_token_id=None))
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    return clip, llm, tokenizer


def test_build_model_from_two_checkpoints(tmp_path):
    clip, llm, base_tokenizer = _save_towers(tmp_path)
    model, processor = build_model(str(tmp_path / "clip"), str(tmp_path / "llm"), projector_type="mbtf_stf")

    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == len(base_tokenizer)  # appended, not an existing id
    assert tok.pad_token == tok.unk_token  # LLaVA pads with <unk>
    assert model.config.image_token_index == processor.image_token_id
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows >= len(tok) and rows % 64 == 0
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert all(p.requires_grad for p in model.parameters())  # the builder freezes nothing

    # Tower and LLM weights are the loaded ones, not fresh random ones.
    assert torch.equal(
        model.model.vision_tower.encoder.layers[3].mlp.fc1.weight, clip.vision_model.encoder.layers[3].mlp.fc1.weight
    )
    assert torch.equal(model.model.language_model.layers[1].mlp.up_proj.weight, llm.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(model.lm_head.weight[: llm.lm_head.weight.shape[0]], llm.lm_head.weight)

    inputs = processor(images=[make_image(0)], text=["USER: <image>\nWhat is it? ASSISTANT:"])
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == model.config.num_image_tokens == 16
    model.eval()
    logits = model(**inputs).logits
    model.save_pretrained(tmp_path / "out")
    processor.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(reloaded(**inputs).logits, logits, rtol=0, atol=0)


def test_build_model_projector_choice(tmp_path):
    _save_towers(tmp_path)
    model, processor = build_model(
        str(tmp_path / "clip"), str(tmp_path / "llm"), projector_type="stf", projector_kwargs={"fused_tokens": 2}
    )
    assert model.config.projector_type == "stf"
    assert processor.num_image_tokens == model.config.num_image_tokens == 32
    assert processor.image_aspect_ratio == "square"


def test_an_in_llm_reducer_survives_the_loaded_decoder(tmp_path):
    """FastV lives in the language model: the decoder loaded from the LLM checkpoint must become its TokenDrop model."""
    _, llm, _ = _save_towers(tmp_path)
    model, processor = build_model(
        str(tmp_path / "clip"), str(tmp_path / "llm"), projector_type="mlp2x_gelu", reducer_type="fastv",
        reducer_kwargs={"k": 1, "r": 0.5},
    )  # fmt: skip
    assert isinstance(model.model.language_model, TokenDropLlamaModel)
    assert torch.equal(model.model.language_model.layers[1].mlp.up_proj.weight, llm.model.layers[1].mlp.up_proj.weight)
    inputs = processor(images=[make_image(0)], text=["USER: <image>\nWhat is it? ASSISTANT:"])
    lengths = []
    model.model.language_model.layers[-1].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    with torch.no_grad():
        model.eval()(**inputs)
    assert lengths == [inputs["input_ids"].shape[1] - model.config.num_image_tokens // 2]
