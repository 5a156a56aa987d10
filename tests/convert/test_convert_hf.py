"""llava-hf both ways: ``--from llava-hf`` matches transformers' LLaVA; ``--to llava-hf`` loads in transformers.

The source is written with the llava-hf hub layout (``language_model.model.*``, ``language_model.lm_head``,
``vision_tower.vision_model.*``, ``multi_modal_projector.*`` in safetensors shards, a transformers-4.36-style
``config.json`` with a partial ``text_config``, a ``CLIPImageProcessor`` that does not pad). The reference is
transformers' own ``LlavaForConditionalGeneration`` holding the same tensors.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

from llava_stf.convert import convert_checkpoint, main
from llava_stf.model.conversion import ConversionError
from llava_stf.testing import make_image, save_tiny_checkpoint, tiny_image_processor, tiny_tokenizer

PROMPT = "USER: <image>\nWhat is shown in the image? ASSISTANT:"
# Our in-memory names -> the llava-hf hub files' names (transformers < 4.52).
HUB_LAYOUT = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]


def hub_key(key: str) -> str:
    for ours, hub in HUB_LAYOUT:
        if key.startswith(ours):
            return hub + key[len(ours) :]
    raise AssertionError(f"no hub name for {key}")


def llava_hf_config_json(tokenizer) -> dict:
    """llava-hf/llava-1.5-7b-hf's config.json shape, on tiny towers (vocab padded to a multiple of 64)."""
    return {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "model_type": "llava",
        "image_token_index": tokenizer.convert_tokens_to_ids("<image>"), "pad_token_id": tokenizer.pad_token_id,
        "projector_hidden_act": "gelu", "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.36.0.dev0", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "vocab_size": 576,
        "text_config": {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096, "torch_dtype": "float32", "vocab_size": 576,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 9,
            "num_attention_heads": 4, "image_size": 32, "patch_size": 4, "projection_dim": 32,
        },
    }  # fmt: skip


def make_llava_hf_source(tmp_path):
    tokenizer = tiny_tokenizer()  # has <image> and <pad>, as llava-hf's does
    config_json = llava_hf_config_json(tokenizer)
    model = LlavaForConditionalGeneration(LlavaConfig(**config_json)).eval()
    src = tmp_path / "llava-hf"
    src.mkdir()
    state_dict = {hub_key(k): v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state_dict)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for i, name in enumerate(files):
        save_file({k: state_dict[k] for k in keys[i::2]}, src / name, metadata={"format": "pt"})
    weight_map = {k: files[i % 2] for i, k in enumerate(keys)}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps(config_json))
    tokenizer.save_pretrained(src)
    tiny_image_processor().save_pretrained(src)
    return src, model


def test_from_llava_hf_matches_transformers(tmp_path):
    src, reference = make_llava_hf_source(tmp_path)
    assert not any(k.startswith("model.") for k in json.loads((src / "model.safetensors.index.json").read_text())[
        "weight_map"])  # fmt: skip
    convert_checkpoint("llava-hf", src, tmp_path / "out")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert processor.image_aspect_ratio == "square"  # llava-hf's CLIPImageProcessor does not pad
    inputs = processor(images=[make_image(1)], text=[PROMPT])
    with torch.no_grad():
        ref_features = reference.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
        ref_logits, logits = reference(**inputs).logits, model(**inputs).logits
    torch.testing.assert_close(features, ref_features, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert ref_logits.std() > 1e-2


def test_export_to_llava_hf_loads_natively(tmp_path):
    ours = save_tiny_checkpoint(tmp_path / "ours", projector_type="mlp2x_gelu", seed=3)
    main(["--to", "llava-hf", str(ours), str(tmp_path / "hf")])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llava" and "projector_type" not in config

    hf_model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    hf_processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert type(hf_processor).__name__ == "LlavaProcessor"
    model = AutoModelForImageTextToText.from_pretrained(ours).eval()
    processor = AutoProcessor.from_pretrained(ours)
    image = make_image(2, size=(30, 52))  # not square: both processors must pad the same way
    ours_inputs = processor(images=[image], text=[PROMPT])
    hf_inputs = hf_processor(images=[image], text=[PROMPT], return_tensors="pt")
    assert hf_inputs["input_ids"].tolist() == ours_inputs["input_ids"].tolist()
    torch.testing.assert_close(hf_inputs["pixel_values"], ours_inputs["pixel_values"], rtol=0, atol=1e-6)
    with torch.no_grad():
        logits = model(**ours_inputs).logits
        torch.testing.assert_close(hf_model(**hf_inputs).logits, logits, rtol=0, atol=1e-5)

    convert_checkpoint("llava-hf", tmp_path / "hf", tmp_path / "back")  # and back again
    back = AutoModelForImageTextToText.from_pretrained(tmp_path / "back").eval()
    assert AutoProcessor.from_pretrained(tmp_path / "back").image_aspect_ratio == "pad"
    with torch.no_grad():
        torch.testing.assert_close(back(**ours_inputs).logits, logits, rtol=0, atol=1e-5)


def test_export_refuses_other_projectors(tmp_path, capsys):
    ours = save_tiny_checkpoint(tmp_path / "ours", projector_type="mbtf_stf")
    assert main(["--to", "llava-hf", str(ours), str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "projector_type 'mbtf_stf'" in err and "'mlp2x_gelu'" in err
    assert not (tmp_path / "hf").exists() and err.strip().splitlines()[-1].startswith("error: ")


def test_llava_hf_folder_with_from_llava_is_refused(tmp_path):
    src, _ = make_llava_hf_source(tmp_path)
    with pytest.raises(ConversionError, match=r"text_config \(a llava-hf config.json; use --from llava-hf\)"):
        convert_checkpoint("llava", src, tmp_path / "out", vision_tower=str(src))
