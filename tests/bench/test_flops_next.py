"""FLOPs of AnyRes (LLaVA-NeXT) presets: crops x tower and projector, the LLM over the image's real token count.

The expected numbers are computed here by hand (token counts derived in the comments, the per-layer polynomial
written out), never through ``llava_stf.flops``' own helpers.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_stf.bench.flops import main
from llava_stf.flops import count_flops
from llava_stf.model.presets import load_preset
from llava_stf.testing import make_image, tiny_next_config, tiny_next_model, tiny_next_processor, tiny_tokenizer

L, D, M = 32, 4096, 11008  # Vicuna-7B
# (preset, height, width): (crops, image tokens). Base crop first, then the unpadded tile grid + one newline per row.
# 672x672: 2x2 tiles -> 48x48 cells (mlp2x_gelu, 24 per tile side) or 24x24 (mbtf_stf, 12), nothing unpadded.
# 336x1008: 1x3 tiles -> 24x72 / 12x36. 375x500 (height x width): best pinpoint 672x672 (2x2 tiles); unpadding keeps
# int(375 * 48 / 500) = 36 of 48 rows (mlp2x_gelu) / int(375 * 24 / 500) = 18 of 24 rows (mbtf_stf).
EXPECTED = {
    ("llava-v1.6-vicuna-7b", 672, 672): (5, 576 + 48 * 48 + 48),  # 2,928
    ("llava-stf-next-7b", 672, 672): (5, 144 + 24 * 24 + 24),  # 744
    ("llava-v1.6-vicuna-7b", 336, 1008): (4, 576 + 24 * 72 + 24),  # 2,328
    ("llava-stf-next-7b", 336, 1008): (4, 144 + 12 * 36 + 12),  # 588
    ("llava-v1.6-vicuna-7b", 375, 500): (5, 576 + 36 * 48 + 36),  # 2,340
    ("llava-stf-next-7b", 375, 500): (5, 144 + 18 * 24 + 18),  # 594
}
PER_CROP_1_5 = {"llava-v1.6-vicuna-7b": "llava-v1.5-7b", "llava-stf-next-7b": "llava-stf-7b"}  # same projector


def layer_macs(n: int) -> int:
    return 4 * n * D * D + 2 * n * n * D + 3 * n * D * M


def clip_macs() -> int:  # CLIP ViT-L/14-336 on one crop: patch embedding + 24 blocks over 577 tokens (2-matrix MLP)
    n, d = 577, 1024
    return 576 * 3 * 14 * 14 * d + 24 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * 4096)


@pytest.mark.parametrize(("preset", "height", "width"), sorted(EXPECTED))
def test_next_presets_match_a_hand_count(preset, height, width):
    crops, tokens = EXPECTED[preset, height, width]
    report = count_flops(load_preset(preset), 40, image_size=(height, width))
    assert (report.crops, report.image_tokens, report.image_size) == (crops, tokens, (height, width))
    assert report.paper == 2 * L * layer_macs(tokens)  # paper convention: image tokens only (newlines included)
    assert report.llm == 2 * L * layer_macs(tokens + 40)
    assert report.vision == 2 * crops * clip_macs()
    assert report.projector == crops * count_flops(load_preset(PER_CROP_1_5[preset])).projector  # per crop
    assert report.image_kv_bytes == 2 * L * 32 * 128 * tokens * 2  # K and V, 32 heads x 128, bf16
    assert report.full == report.vision + report.projector + report.llm + 2 * D * 32064


def test_reference_figures_at_672():
    full, stf = (count_flops(load_preset(p)) for p in ("llava-v1.6-vicuna-7b", "llava-stf-next-7b"))
    assert full.image_size == stf.image_size == (672, 672)  # the AnyRes default
    assert full.paper / 1e12 == pytest.approx(42.418, abs=5e-4) and stf.paper / 1e12 == pytest.approx(9.927, abs=5e-4)
    assert full.image_kv_bytes / 2**20 == 1464 and stf.image_kv_bytes / 2**20 == 372


@pytest.mark.parametrize("text", [0, 40, 200])
def test_llm_ratio_is_2928_plus_t_over_744_plus_t(text):
    full, stf = (count_flops(load_preset(p), text) for p in ("llava-v1.6-vicuna-7b", "llava-stf-next-7b"))
    assert full.llm / stf.llm == pytest.approx(layer_macs(2928 + text) / layer_macs(744 + text), rel=1e-12)


def test_llm_ratio_at_40_text_tokens_and_its_shrinking_with_text():
    def ratio(text: int) -> float:
        full, stf = (count_flops(load_preset(p), text) for p in ("llava-v1.6-vicuna-7b", "llava-stf-next-7b"))
        return full.llm / stf.llm

    # 4.27x visual-only (above the token ratio 3.94: the quadratic term), 4.11x with 40 text tokens, less with more
    assert ratio(0) == pytest.approx(4.273, abs=1e-3) and ratio(40) == pytest.approx(4.110, abs=1e-3)
    assert ratio(0) > ratio(40) > ratio(200) > 3.5


def test_1_5_presets_ignore_the_image_size():
    for preset in ("llava-v1.5-7b", "llava-stf-7b"):
        config = load_preset(preset)
        resized = count_flops(config, 40, image_size=(375, 500))
        assert (resized.crops, resized.image_tokens) == (1, config.num_image_tokens)
        assert resized.full == count_flops(config, 40).full


REDUCER_KWARGS = {"fastv": {"k": 1, "r": 0.5}, "visionzip": {"dominant": 6, "contextual": 2}}


@pytest.mark.parametrize(
    ("projector", "reducer"),
    [("mlp2x_gelu", None), ("mbtf_stf", None), ("mlp2x_gelu", "fastv"), ("mlp2x_gelu", "visionzip")],
)
def test_tiny_next_full_prefill_matches_flop_counter_mode(projector, reducer):
    # A non-square image (unpadded rows) through the real AnyRes model: every matmul torch runs is counted.
    # VisionZip: the projector and the reducer's own work run per crop on the crop's kept tokens.
    tokenizer = tiny_tokenizer()
    kwargs = {"reducer_type": reducer, "reducer_kwargs": REDUCER_KWARGS[reducer]} if reducer else {}
    config = tiny_next_config(tokenizer, projector, **kwargs)
    model = tiny_next_model(config)
    model.set_attn_implementation("eager")  # FlopCounterMode sees the attention matmuls only in eager mode
    width, height = 100, 50
    inputs = tiny_next_processor(config, tokenizer)(
        images=[make_image(0, size=(width, height))], text=["USER: <image>\nWhat is in the picture? ASSISTANT:"]
    )
    n_text = inputs["input_ids"].shape[1] - config.image_token_count(height, width)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs, logits_to_keep=1)
    report = count_flops(config, n_text, image_size=(height, width))
    assert report.crops == 3 and counter.get_total_flops() == report.full  # 1x2 tiles + base


def test_report_prints_crops_kv_and_the_token_table(capsys):
    main(["--preset", "llava-v1.6-vicuna-7b", "llava-stf-next-7b", "--text-tokens", "40"])
    out = capsys.readouterr().out.splitlines()
    assert "672x672 px" in out[0]
    assert out[2].split()[-2:] == ["5", "1464.0"] and out[3].split()[-2:] == ["5", "372.0"]
    table = {line.split("x")[0].strip() + "x" + line.split()[2]: line.split()[3:] for line in out[-5:]}
    assert table["672x672"] == ["5", "2,928", "5", "744", "3.94x"]
    assert table["336x1008"] == ["4", "2,328", "4", "588", "3.96x"]
    assert table["336x672"] == ["3", "1,752", "3", "444", "3.95x"]
    assert table["375x500"] == ["5", "2,340", "5", "594", "3.94x"]
