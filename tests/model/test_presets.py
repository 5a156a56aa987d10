"""Presets build on the real 7B/13B shapes on the meta device, with the counts the references give."""

from __future__ import annotations

import pytest

from llava_stf.model.presets import build_meta_model, list_presets, load_preset, parameter_counts


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds_on_meta(name):
    model = build_meta_model(name)
    assert all(p.is_meta for p in model.parameters())
    assert model.config.num_image_tokens in (36, 64, 144, 288, 576)


@pytest.mark.parametrize(
    "name, tokens, projector_params",
    [
        ("llava-v1.5-7b", 576, 20_979_712),  # haotian-liu/LLaVA multimodal_projector/builder.py mlp2x_gelu
        ("llava-v1.5-13b", 576, 31_467_520),
        ("llava-stf-7b", 144, 171_992_064),  # visresearch/LLaVA-STF: mm_projector_crosslayer + mm_projector
        ("llava-stf-13b", 144, 188_770_304),
    ],
)
def test_reference_parameter_counts(name, tokens, projector_params):
    model = build_meta_model(name)
    assert model.config.num_image_tokens == tokens
    assert parameter_counts(model)["projector"] == projector_params


def test_official_stack_keys_and_shapes():
    config = load_preset("llava-stf-7b")
    assert config.vision_feature_layer == [23, 21, 18, 15, 12, 9, 6, 3]
    shapes = {k: tuple(v.shape) for k, v in build_meta_model(config).model.multi_modal_projector.state_dict().items()}
    assert shapes == {
        "mbtf.0.weight": (4096, 8192),
        "mbtf.0.bias": (4096,),
        "mbtf.2.weight": (1024, 4096),
        "mbtf.2.bias": (1024,),
        "stf.fusion.weight": (16384, 1024, 2, 2),
        "stf.fusion.bias": (16384,),
        "stf.align.1.weight": (4096, 16384),
        "stf.align.1.bias": (4096,),
    }


def test_unknown_preset_lists_available():
    with pytest.raises(FileNotFoundError, match="llava-stf-7b"):
        load_preset("no-such-preset")


@pytest.mark.parametrize(
    "name, per_crop, at_672, total_params",
    [
        # the llava-v1.5-7b preset's 7,063,427,072 parameters + image_newline's 4,096; 5 x 576 + 48 tokens
        ("llava-v1.6-vicuna-7b", 576, 2928, 7_063_431_168),
        ("llava-stf-next-7b", 144, 744, 7_214_443_520),  # llava-stf-7b's 7,214,439,424 + 4,096; 5 x 144 + 24
    ],
)
def test_anyres_presets_count_tokens_per_crop_and_per_image(name, per_crop, at_672, total_params):
    model = build_meta_model(name)
    config = model.config
    assert config.anyres and type(model).__name__ == "LlavaStfNextForConditionalGeneration"
    assert config.num_image_tokens == per_crop and config.image_token_count(672, 672) == at_672
    assert config.num_crops(672, 672) == 5 and model.model.image_newline.shape == (4096,)
    assert sum(p.numel() for p in model.parameters()) == sum(parameter_counts(model).values()) == total_params
