"""bench.latency on AnyRes (LLaVA-NeXT) tiny shapes: crops in, the image's own token count (newlines included) in the
prompt, exact KV bytes and FLOPs, and the issue-14 target lines. Timings are printed, never asserted."""

from __future__ import annotations

import torch

from llava_stf.bench.latency import Row, main, targets
from llava_stf.bench.variants import base_config, build, image_inputs, variant_config
from llava_stf.flops import count_flops, default_image_size


def test_anyres_side_by_side_run(capsys):
    threads = torch.get_num_threads()
    try:
        args = ["--size", "tiny", "--anyres", "--image-size", "32", "96", "--repeats", "1", "--new-tokens", "3"]
        rows = main([*args, "--text-tokens", "12", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out.splitlines()
    assert "1 AnyRes 32x96 image (4 crops)" in out[0] and "load average" in out[0]
    assert out[1].split()[:4] == ["variant", "img", "LLM", "TTFT"] and "proj%" in out[1] and "KV-MB" in out[1]
    assert [line.split()[0] for line in out[2:4]] == ["mlp2x_gelu", "mbtf_stf"]  # the NeXT presets' projectors
    assert out[-1].startswith("target mbtf_stf: speed-up") and "projector" in out[-1] and "(>= 85%)" in out[-1]
    base = base_config(None, "tiny", anyres=True)
    text = base.text_config
    per_token = 2 * text.num_hidden_layers * text.hidden_size * 4  # keys + values, fp32
    # 32x96 px at 32-px crops: 1x3 tiles + base; 8x8 patches per crop (mlp2x_gelu: 64 tokens, mbtf_stf: 4x4 = 16)
    full, stf = rows
    assert (full.crops, full.image_tokens, full.llm_tokens) == (4, 64 + 8 * 24 + 8, 12 + 264)
    assert (stf.crops, stf.image_tokens, stf.llm_tokens) == (4, 16 + 4 * 12 + 4, 12 + 68)
    assert full.kv_bytes == full.llm_tokens * per_token and stf.kv_bytes == stf.llm_tokens * per_token
    for row in rows:
        config = variant_config(base, row.spec)
        assert row.image_tokens == config.image_token_count(32, 96)
        assert row.llm_flops == count_flops(config, 12, image_size=(32, 96)).llm
        assert all(t >= 0 for t in row.times.values()) and row.times["prefill"] >= row.times["llm"]


def test_anyres_variants_share_every_weight_but_the_projector():
    base = base_config(None, "tiny", anyres=True)
    assert base.anyres and base.image_grid_pinpoints == [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
    assert default_image_size(base) == (64, 64)  # 2 x 2 crops (672x672 at 336 px)
    (_, _, a), (_, _, b) = build(base, ["mlp2x_gelu", "mbtf_stf"], torch.device("cpu"), torch.float32)
    assert not any(p.is_meta for m in (a, b) for p in m.parameters())
    assert a.model.image_newline is b.model.image_newline and a.lm_head is b.lm_head
    assert a.model.multi_modal_projector is not b.model.multi_modal_projector
    inputs = image_inputs(base, 64, 64, 2, torch.device("cpu"), torch.float32)
    assert inputs["pixel_values"].shape == (2, 5, 3, 32, 32) and inputs["image_sizes"].tolist() == [[64, 64]] * 2
    assert image_inputs(base_config(None, "tiny"), 64, 64, 2, "cpu", torch.float32).keys() == {"pixel_values"}


def row(spec: str, llm_ms: float, projector_ms: float, flops: int) -> Row:
    times = {"prefill": 100.0, "vision": 10.0, "reducer": 0.0, "projector": projector_ms, "llm": llm_ms}
    return Row(spec, 0, 0, times, 1.0, 0, None, flops, flops)


def test_anyres_target_needs_85_percent_and_a_small_projector():
    ref = row("mlp2x_gelu", 80.0, 1.0, 400)
    lines = targets([ref, row("mbtf_stf", 20.0, 4.0, 100), row("tokenpacker", 25.0, 4.0, 100)], anyres=True)
    assert lines[0].endswith("meets") and "4.00x of 4.00x = 100%" in lines[0]
    assert lines[1].endswith("MISSES") and "80% of the FLOPs ratio (>= 85%)" in lines[1]
    assert targets([ref, row("mbtf_stf", 20.0, 6.0, 100)], anyres=True)[0].endswith("MISSES")  # projector 6 %
    assert targets([ref, row("mbtf_stf", 20.0, 4.0, 100)]) == []  # LLaVA-1.5: no projector target, as before
