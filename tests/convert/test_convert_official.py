"""``--from llava-stf-official``: the official LLaVA-STF release (tiny, exact key layout) converts to the same outputs.

The source has LLaVA-1.5's layout plus ``model.mm_projector_crosslayer.{0,2}`` (MBTF) and a redefined
``model.mm_projector.{0,2}`` (the STF MLP on 2x2 windows), one ``model.safetensors``, and a ``config.json`` that says
``mm_projector_type: mlp2x_gelu`` and ``do_sample: true``. The reference is written out here: 8 CLIP hidden states
deepest first without CLS, concatenated, Linear-GELU-Linear per token, 2x2 windows flattened (ch, dy, dx) by explicit
indexing, Linear-GELU-Linear, spliced in place of the image tag, then the Llama LM. The tiny tower has 9 blocks, so
the test records the indices in the source config (``vision_feature_layer``) as the converter expects for towers
other than the release's 24-block CLIP.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPVisionModel, LlamaForCausalLM

from llava_stf.convert import convert_checkpoint, convert_projector_file, main
from llava_stf.model.conversion import ConversionError, convert_projector_state_dict
from llava_stf.model.conversion_config import official_vision_layers
from llava_stf.testing import (
    make_image,
    tiny_config,
    tiny_image_processor,
    tiny_model,
    tiny_text_config,
    tiny_tokenizer,
    tiny_vision_config,
)

PROMPT = "USER: <image>\nDescribe the image briefly. ASSISTANT:"
LAYERS = [-2, 7, 5, 4, 3, 2, 1, 0]  # the release's pattern (penultimate first, then shallower) on a 9-block tower
C, GRID, K = 32, 8, 2  # tiny CLIP width, patch grid, STF window


def official_config_json(vocab: int, tower: str) -> dict:
    """The release's config.json: a LLaVA-1.5 LlavaLlamaConfig, nothing that says STF (plus our index list)."""
    fields = dict(
        architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama", bos_token_id=1, eos_token_id=2,
        pad_token_id=0, hidden_act="silu", hidden_size=64, intermediate_size=128, max_position_embeddings=4096,
        num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling=None, tie_word_embeddings=False, vocab_size=vocab, torch_dtype="float32",
        mm_vision_tower=tower, use_mm_proj=True, mm_projector_type="mlp2x_gelu", mm_hidden_size=C,
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_patch_merge_type="flat",
        image_aspect_ratio="pad", tokenizer_padding_side="right", tokenizer_model_max_length=4096,
        mm_use_im_start_end=False, mm_use_im_patch_token=False, tune_mm_mlp_adapter=False,
    )  # fmt: skip
    return fields | {"vision_feature_layer": LAYERS}


def connector() -> tuple[nn.Sequential, nn.Sequential]:
    """The release's two modules: crosslayer 8C -> 4C -> C and the STF MLP 4C -> 16C -> H."""
    crosslayer = nn.Sequential(nn.Linear(8 * C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))
    mlp = nn.Sequential(nn.Linear(4 * C, 16 * C), nn.GELU(), nn.Linear(16 * C, 64))
    return crosslayer, mlp


def connector_state_dict(crosslayer: nn.Module, mlp: nn.Module) -> dict[str, torch.Tensor]:
    return {f"model.mm_projector_crosslayer.{k}": v for k, v in crosslayer.state_dict().items()} | {
        f"model.mm_projector.{k}": v for k, v in mlp.state_dict().items()
    }


def make_source(tmp_path) -> SimpleNamespace:
    tokenizer = tiny_tokenizer(with_image_token=False, with_pad_token=False)
    tokenizer.pad_token = tokenizer.unk_token
    tower = CLIPVisionModel(tiny_vision_config()).eval()
    llm = LlamaForCausalLM(tiny_text_config(len(tokenizer), pad_token_id=0)).eval()
    crosslayer, mlp = connector()
    clip_dir, src = tmp_path / "clip", tmp_path / "official"
    tower.config.save_pretrained(clip_dir)  # config + preprocessing only: the release carries the tower weights
    tiny_image_processor().save_pretrained(clip_dir)
    state_dict = dict(llm.state_dict()) | connector_state_dict(crosslayer, mlp)
    state_dict |= {f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in tower.state_dict().items()}
    src.mkdir()
    save_file({k: v.contiguous() for k, v in state_dict.items()}, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(official_config_json(len(tokenizer), str(clip_dir))))
    gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": True, "temperature": 0.9}
    (src / "generation_config.json").write_text(json.dumps(gen | {"top_p": 0.6, "max_length": 4096}))
    tokenizer.save_pretrained(src)
    return SimpleNamespace(src=src, clip=clip_dir, tower=tower, llm=llm, crosslayer=crosslayer, mlp=mlp)


def windows_ch_dy_dx(x: torch.Tensor) -> torch.Tensor:
    """``[B, GRID*GRID, C]`` -> ``[B, (GRID/K)**2, C*K*K]`` with ``v[ch*K*K + dy*K + dx] = x[K*I+dy, K*J+dx, ch]``."""
    grid = x.reshape(x.shape[0], GRID, GRID, C)
    g = GRID // K
    out = torch.empty(x.shape[0], g * g, C * K * K)
    for i in range(g):
        for j in range(g):
            for dy in range(K):
                for dx in range(K):
                    out[:, i * g + j, dy * K + dx :: K * K] = grid[:, K * i + dy, K * j + dx, :]
    return out


def official_connector(crosslayer, mlp, hidden_states, layers=LAYERS) -> torch.Tensor:
    """The release's connector on CLIP hidden states: ``[B, GRID*GRID, 8C]`` -> ``[B, (GRID/K)**2, H]``."""
    x = torch.cat([hidden_states[i][:, 1:] for i in layers], dim=-1)
    return mlp(windows_ch_dy_dx(crosslayer(x)))


@torch.no_grad()
def reference(source, pixel_values, input_ids, image_token_id):
    hidden = source.tower(pixel_values, output_hidden_states=True).hidden_states
    features = official_connector(source.crosslayer, source.mlp, hidden)[0]
    ids = input_ids[0]
    is_image = ids == image_token_id
    embeds = torch.zeros(len(ids), features.shape[-1])
    embeds[~is_image] = source.llm.get_input_embeddings()(ids[~is_image])
    embeds[is_image] = features
    return features, source.llm(inputs_embeds=embeds[None]).logits


def test_official_checkpoint_matches_reference(tmp_path):
    source = make_source(tmp_path)
    notes = convert_checkpoint("llava-stf-official", source.src, tmp_path / "out")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    inputs = processor(images=[make_image(3, size=(36, 50))], text=[PROMPT])
    ref_features, ref_logits = reference(source, inputs["pixel_values"], inputs["input_ids"], processor.image_token_id)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
        logits = model(**inputs).logits
    torch.testing.assert_close(features, ref_features, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[..., : ref_logits.shape[-1]], ref_logits, rtol=0, atol=1e-5)
    assert ref_logits.std() > 1e-2

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["projector_type"] == "mbtf_stf"
    assert config["vision_feature_layer"] == [8, 7, 5, 4, 3, 2, 1, 0]  # explicit, -2 resolved
    assert config["image_seq_length"] == processor.num_image_tokens == 16
    assert processor.image_aspect_ratio == "pad" and processor.tokenizer.model_max_length == 4096
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation.get("do_sample", False) is False and "top_p" not in generation
    assert any("do_sample=True" in n and "top_p=0.6" in n for n in notes)


def test_reference_window_order_is_discriminating():
    """The (dy, dx, ch) flattening (einops' default) gives other features: the reference pins the order."""
    x = torch.randn(1, GRID * GRID, C)
    ch_major = windows_ch_dy_dx(x)
    grid = x.reshape(1, GRID // K, K, GRID // K, K, C).permute(0, 1, 3, 2, 4, 5)
    spatial_major = grid.reshape(1, (GRID // K) ** 2, K * K * C)
    assert not torch.allclose(ch_major, spatial_major)
    unshuffled = torch.nn.functional.pixel_unshuffle(x.transpose(1, 2).reshape(1, C, GRID, GRID), K)
    torch.testing.assert_close(ch_major, unshuffled.flatten(2).transpose(1, 2), rtol=0, atol=0)


def test_official_indices():
    assert official_vision_layers({"mm_vision_select_layer": -2}, 24) == [23, 21, 18, 15, 12, 9, 6, 3]
    assert official_vision_layers({"vision_feature_layer": [-2, 1]}, 9, override=[3, 2]) == [3, 2]
    with pytest.raises(ConversionError, match="--vision-feature-layer"):
        official_vision_layers({"mm_vision_select_layer": -2}, 9)
    with pytest.raises(ConversionError, match=r"out of range"):
        official_vision_layers({}, 9, override=[12])


def test_official_keys_with_from_llava_name_the_crosslayer(tmp_path, capsys):
    source = make_source(tmp_path)
    assert main(["--from", "llava", str(source.src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "model.mm_projector_crosslayer.0.weight" in err and "model.mm_projector_crosslayer.2.bias" in err
    assert err.strip().splitlines()[-1] == (  # the keys above, then one error line with the hint
        "error: cannot convert the 'llava' checkpoint (the keys are listed above); hint: these keys look like a "
        "'llava-stf-official' checkpoint; check --from"
    )
    assert not (tmp_path / "out").exists()


def test_official_non_24_block_tower_needs_indices(tmp_path):
    source = make_source(tmp_path)
    config = json.loads((source.src / "config.json").read_text())
    del config["vision_feature_layer"]
    (source.src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="24-block CLIP, but this vision tower has 9 blocks"):
        convert_checkpoint("llava-stf-official", source.src, tmp_path / "out")
    layers = ",".join(map(str, LAYERS))
    main(["--from", "llava-stf-official", str(source.src), str(tmp_path / "out"), f"--vision-feature-layer={layers}"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vision_feature_layer"] == [
        8,
        7,
        5,
        4,
        3,
        2,
        1,
        0,
    ]


def test_official_projector_only(tmp_path):
    crosslayer, mlp = connector()
    torch.save(connector_state_dict(crosslayer, mlp), tmp_path / "mm_projector.bin")
    convert_projector_file("llava-stf-official", tmp_path / "mm_projector.bin", tmp_path / "projector.safetensors")
    model = tiny_model(tiny_config(projector_type="mbtf_stf", vision_feature_layer=[8, 7, 5, 4, 3, 2, 1, 0]))
    projector = model.model.multi_modal_projector
    projector.load_state_dict(load_file(tmp_path / "projector.safetensors"), strict=True)
    shapes = {k: tuple(v.shape) for k, v in projector.state_dict().items()}  # as the training code passes them
    in_memory = convert_projector_state_dict("llava-stf-official", connector_state_dict(crosslayer, mlp), shapes)
    assert all(torch.equal(in_memory[k], v) for k, v in projector.state_dict().items())
    hidden = [torch.randn(2, 1 + GRID * GRID, C) for _ in range(9)]
    features = torch.cat([hidden[i][:, 1:] for i in LAYERS], dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(
            model.model.multi_modal_projector(features), official_connector(crosslayer, mlp, hidden), atol=1e-5, rtol=0
        )


def test_official_projector_without_crosslayer_is_an_error(tmp_path):
    """The release would leave MBTF silently random here; the converter refuses and names the keys."""
    crosslayer, mlp = connector()
    state_dict = {k: v for k, v in connector_state_dict(crosslayer, mlp).items() if "crosslayer" not in k}
    torch.save(state_dict, tmp_path / "mm_projector.bin")
    with pytest.raises(ConversionError, match=r"model\.mm_projector_crosslayer\.0\.weight"):
        convert_projector_file("llava-stf-official", tmp_path, tmp_path / "projector.safetensors")
