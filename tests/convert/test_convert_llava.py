"""``--from llava``: an original LLaVA-1.5 checkpoint (tiny, exact key layout) converts to the same outputs.

The source is written the way ``LlavaLlamaForCausalLM`` saves it: ``model.embed_tokens``, ``model.layers.N``,
``model.norm``, ``lm_head``, ``model.mm_projector.{0,2}`` and (sometimes) ``model.vision_tower.vision_tower.
vision_model.*``, in sharded ``pytorch_model-*.bin`` files, with a ``LlavaLlamaConfig``-style ``config.json`` and a
tokenizer without ``<image>``. The reference output is computed in the test from the source modules: CLIP hidden
state -2 without CLS, Linear-GELU-Linear, spliced in place of the image tag, then the Llama LM.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPVisionModel, LlamaForCausalLM

from llava_stf.convert import convert_checkpoint, main
from llava_stf.model.conversion import ConversionError, convert_projector_state_dict
from llava_stf.testing import (
    make_image,
    tiny_config,
    tiny_image_processor,
    tiny_model,
    tiny_text_config,
    tiny_tokenizer,
    tiny_vision_config,
)

PROMPT = "USER: <image>\nWhat is shown in the image? ASSISTANT:"
TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
ROPE_THETA = 50000.0  # not the Llama default, so the text fields must be carried over


def llava_config_json(vocab: int, tower: str, **overrides) -> dict:
    """A LlavaLlamaConfig as LLaVA-1.5 training writes it (transformers 4.37 field names)."""
    fields = dict(
        architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama", bos_token_id=1, eos_token_id=2,
        pad_token_id=0, hidden_act="silu", hidden_size=64, intermediate_size=128, initializer_range=0.02,
        max_position_embeddings=4096, num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=2,
        pretraining_tp=1, rms_norm_eps=1e-6, rope_scaling=None, rope_theta=ROPE_THETA, attention_bias=False,
        tie_word_embeddings=False, use_cache=True, vocab_size=vocab, torch_dtype="float32", max_length=4096,
        transformers_version="4.37.2", mm_vision_tower=tower, use_mm_proj=True, mm_projector_type="mlp2x_gelu",
        mm_hidden_size=32, mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_patch_merge_type="flat",
        image_aspect_ratio="pad", image_grid_pinpoints=None, tokenizer_padding_side="right",
        tokenizer_model_max_length=2048, tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=False, mm_projector_lr=None,
        mm_use_im_start_end=False, mm_use_im_patch_token=False, unfreeze_mm_vision_tower=False,
    )  # fmt: skip
    return fields | overrides


def make_source(tmp_path, with_tower: bool = True, shards: int = 2) -> SimpleNamespace:
    """Random tiny LLaVA-1.5 modules, saved as a checkpoint folder; the modules serve as the reference."""
    tokenizer = tiny_tokenizer(with_image_token=False, with_pad_token=False)
    tokenizer.pad_token = tokenizer.unk_token  # LLaVA v1 training sets this before saving
    tower = CLIPVisionModel(tiny_vision_config()).eval()
    llm = LlamaForCausalLM(tiny_text_config(len(tokenizer), pad_token_id=0, rope_theta=ROPE_THETA)).eval()
    projector = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64))
    clip_dir, src = tmp_path / "clip", tmp_path / "llava"
    tower.save_pretrained(clip_dir)
    tiny_image_processor().save_pretrained(clip_dir)
    state_dict = dict(llm.state_dict()) | {f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}
    if with_tower:
        state_dict |= {TOWER_PREFIX + k: v for k, v in tower.state_dict().items()}
    src.mkdir()
    keys = sorted(state_dict)
    files = [f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" for i in range(shards)] if shards > 1 else []
    for i, name in enumerate(files):
        torch.save({k: state_dict[k].clone() for k in keys[i::shards]}, src / name)
    if files:
        weight_map = {k: files[i % shards] for i, k in enumerate(keys)}
        (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        torch.save({k: v.clone() for k, v in state_dict.items()}, src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps(llava_config_json(len(tokenizer), str(clip_dir))))
    gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": True, "temperature": 0.9}
    (src / "generation_config.json").write_text(json.dumps(gen | {"top_p": 0.6, "max_length": 4096}))
    tokenizer.save_pretrained(src)
    return SimpleNamespace(
        src=src, clip=clip_dir, tower=tower, llm=llm, projector=projector, tokenizer=tokenizer, state_dict=state_dict
    )


@torch.no_grad()
def reference(source: SimpleNamespace, pixel_values, input_ids, image_token_id):
    """LLaVA-1.5: hidden_states[-2] without CLS -> mm_projector -> rows in place of the image tag -> Llama."""
    hidden = source.tower(pixel_values, output_hidden_states=True).hidden_states
    features = source.projector(hidden[-2][:, 1:])[0]
    ids = input_ids[0]
    is_image = ids == image_token_id
    embeds = torch.zeros(len(ids), features.shape[-1])
    embeds[~is_image] = source.llm.get_input_embeddings()(ids[~is_image])
    embeds[is_image] = features
    return features, source.llm(inputs_embeds=embeds[None]).logits


def check_against_reference(source: SimpleNamespace, dst) -> None:
    model = AutoModelForImageTextToText.from_pretrained(dst).eval()
    processor = AutoProcessor.from_pretrained(dst)
    inputs = processor(images=[make_image(0, size=(48, 40))], text=[PROMPT])
    ref_features, ref_logits = reference(source, inputs["pixel_values"], inputs["input_ids"], processor.image_token_id)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
        logits = model(**inputs).logits
    torch.testing.assert_close(features, ref_features, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[..., : ref_logits.shape[-1]], ref_logits, rtol=0, atol=1e-5)
    assert ref_logits.std() > 1e-2  # a wrong mapping would not hide under the tolerance


def test_llava_checkpoint_matches_reference(tmp_path):
    source = make_source(tmp_path, with_tower=True, shards=2)
    notes = convert_checkpoint("llava", source.src, tmp_path / "out")
    check_against_reference(source, tmp_path / "out")

    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    tok, base = processor.tokenizer, source.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == len(base)  # a new id, appended
    assert tok.pad_token == tok.unk_token == "<unk>"
    assert tok("What is shown?")["input_ids"] == base("What is shown?")["input_ids"]
    assert processor.image_aspect_ratio == "pad" and processor.num_image_tokens == 64
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["projector_type"] == "mlp2x_gelu" and config["vision_feature_layer"] == -2
    assert config["image_token_index"] == len(base) and config["text_config"]["vocab_size"] == 576  # 513 -> 576
    weights = load_file(tmp_path / "out" / "model.safetensors")
    lm_head = weights["language_model.lm_head.weight"]
    torch.testing.assert_close(lm_head[len(base) :], lm_head[: len(base)].mean(0).expand(576 - len(base), -1))
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation.get("do_sample", False) is False and "temperature" not in generation
    assert generation["pad_token_id"] == tok.unk_token_id and generation["max_length"] == 4096
    assert any("do_sample=True" in n and "temperature=0.9" in n for n in notes)


def test_llava_tower_taken_from_clip_checkpoint(tmp_path, capsys):
    source = make_source(tmp_path, with_tower=False, shards=1)
    main(["--from", "llava", str(source.src), str(tmp_path / "out"), "--vision-tower", str(source.clip)])
    assert "wrote" in capsys.readouterr().out
    check_against_reference(source, tmp_path / "out")


def test_llava_projector_only(tmp_path):
    projector = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64))
    torch.save({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}, tmp_path / "mm_projector.bin")
    main(["--projector-only", "--from", "llava", str(tmp_path), str(tmp_path / "projector.safetensors")])
    model = tiny_model(tiny_config(projector_type="mlp2x_gelu"))
    model.model.multi_modal_projector.load_state_dict(load_file(tmp_path / "projector.safetensors"), strict=True)
    x = torch.randn(2, 64, 32)
    torch.testing.assert_close(model.model.multi_modal_projector(x), projector(x), rtol=0, atol=1e-6)
    stf = tiny_model(tiny_config(projector_type="mbtf_stf")).model.multi_modal_projector  # the wrong target
    shapes = {k: tuple(v.shape) for k, v in stf.state_dict().items()}
    with pytest.raises(ConversionError, match=r"(?s)missing keys .*stf\.fusion\.weight"):
        convert_projector_state_dict("llava", torch.load(tmp_path / "mm_projector.bin", weights_only=True), shapes)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), "model.language_model.layers.1.mlp.up_proj.weight"),
        (lambda sd: sd.update({"model.mm_projector.4.weight": torch.zeros(2)}), "model.mm_projector.4.weight"),
        (lambda sd: sd.update({"model.mm_projector.2.bias": torch.zeros(63)}), "source [63], expected [64]"),
        (lambda sd: sd.pop(TOWER_PREFIX + "post_layernorm.bias"), TOWER_PREFIX + "post_layernorm.bias"),
    ],
    ids=["missing", "unexpected", "shape", "missing-tower-key"],
)
def test_llava_bad_checkpoint_names_the_keys(tmp_path, edit, expected):
    source = make_source(tmp_path, with_tower=True, shards=1)
    state_dict = torch.load(source.src / "pytorch_model.bin", weights_only=True)
    edit(state_dict)
    torch.save(state_dict, source.src / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="cannot convert the 'llava' checkpoint") as err:
        convert_checkpoint("llava", source.src, tmp_path / "out")
    assert expected in str(err.value)


def test_llava_unsupported_config_field(tmp_path):
    source = make_source(tmp_path, with_tower=True, shards=1)
    config = json.loads((source.src / "config.json").read_text())
    (source.src / "config.json").write_text(json.dumps(config | {"mm_use_im_start_end": True}))
    with pytest.raises(ConversionError, match="mm_use_im_start_end=True"):
        convert_checkpoint("llava", source.src, tmp_path / "out")


def test_llava_checkpoint_with_from_official_names_the_missing_crosslayer(tmp_path):
    source = make_source(tmp_path, with_tower=True, shards=1)
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(
            "llava-stf-official", source.src, tmp_path / "out", vision_feature_layer=[8, 7, 6, 5, 4, 3, 2, 1]
        )
    message = str(err.value)
    assert "model.multi_modal_projector.mbtf.0.weight (source key model.mm_projector_crosslayer.0.weight)" in message
    assert "hint: these keys look like a 'llava' checkpoint" in message
