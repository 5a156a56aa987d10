"""bench.latency on tiny shapes: one run measures every variant; KV-cache bytes and FLOPs are the exact ones.

Timings are printed, never asserted (they depend on the machine)."""

from __future__ import annotations

import torch

from llava_stf.bench.latency import main
from llava_stf.bench.variants import base_config, variant_config
from llava_stf.flops import count_flops


def test_side_by_side_run_reports_exact_cache_sizes(capsys):
    variants = ["mlp2x_gelu", "mbtf_stf", "mlp2x_gelu+fastv", "mlp2x_gelu+prumerge"]
    threads = torch.get_num_threads()
    try:
        args = ["--size", "tiny", "--repeats", "1", "--new-tokens", "3", "--text-tokens", "12", "--threads", "1"]
        rows = main([*args, "--variants", *variants])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[-6:-2]] == variants
    assert [line.split()[1] for line in printed[-2:]] == [f"{v}:" for v in variants[2:]]  # one per reduced variant
    base = base_config(None, "tiny")
    text = base.text_config
    per_token = 2 * text.num_hidden_layers * text.hidden_size * 4  # keys + values, fp32, no GQA in these shapes
    full, stf, fastv, prumerge = rows
    assert (full.image_tokens, full.llm_tokens, full.kv_bytes) == (64, 76, 76 * per_token)
    assert (stf.image_tokens, stf.llm_tokens, stf.kv_bytes) == (16, 28, 28 * per_token)
    # FastV (K=2, R=0.5): layers 0-1 cache all 76 tokens, layers 2-3 the 44 survivors
    assert (fastv.image_tokens, fastv.llm_tokens) == (64, 44)
    assert fastv.kv_bytes == per_token // text.num_hidden_layers * (2 * 76 + 2 * 44)
    # PruMerge: the LLM and its cache see only the adaptive count (+1 extra token), not the 17 placeholders
    assert 2 <= prumerge.image_tokens <= 17 and prumerge.llm_tokens == 12 + prumerge.image_tokens
    assert prumerge.kv_bytes == prumerge.llm_tokens * per_token
    config = variant_config(base, "mlp2x_gelu+prumerge")
    assert prumerge.llm_flops == count_flops(config, 12, reducer_tokens=prumerge.image_tokens - 1).llm
    for row in rows:
        assert row.decode_tps > 0 and row.peak_bytes is None
        assert all(t >= 0 for t in row.times.values()) and row.times["prefill"] >= row.times["llm"]


def test_budget_variants_and_reducer_time(capsys):
    # "+reducer@tokens" maps the budget through the reducer's own rule; in-LLM reducer time is measured, not zero.
    threads = torch.get_num_threads()
    try:
        args = ["--size", "tiny", "--repeats", "1", "--new-tokens", "2", "--text-tokens", "8", "--threads", "1"]
        rows = main([*args, "--reducers", "fastv", "prumerge", "--tokens", "16", "48"])
    finally:
        torch.set_num_threads(threads)
    assert [r.spec for r in rows] == ["mlp2x_gelu", "mlp2x_gelu+fastv@16", "mlp2x_gelu+fastv@48", "mlp2x_gelu+prumerge"]
    assert [r.llm_tokens for r in rows[:3]] == [72, 8 + 16, 8 + 48]  # kept after layer K
    assert rows[1].times["reducer"] > 0 and rows[0].times["reducer"] < rows[1].times["reducer"]
    assert variant_config(base_config(None, "tiny"), "mlp2x_gelu+fastv@16").reducer_kwargs == {"k": 2, "r": 0.75}


def test_llm_time_ends_after_the_last_layer_even_when_a_reducer_calls_the_final_norm():
    # DART calls the model's final norm while it chooses (after layer 1): the LLM's end mark must be the norm's last
    # call, after the last decoder layer, not that first call (it once made DART's LLM look 13x faster on a GPU).
    from llava_stf.bench.timing import Clock, prefill
    from llava_stf.bench.variants import build

    base = base_config(None, "tiny")
    ((_, config, model),) = build(base, ["mlp2x_gelu+dart@16"], torch.device("cpu"), torch.float32)
    clock, ends = Clock(torch.device("cpu")), []
    handle = model.model.language_model.layers[-1].register_forward_hook(lambda *_: ends.append(clock.now()))
    size = config.vision_config.image_size
    ids = torch.cat([torch.full((config.num_image_tokens,), config.image_token_id), torch.arange(3, 11)])[None]
    try:
        prefill(model, ids, torch.randn(1, 3, size, size), clock)
    finally:
        handle.remove()
    assert len(ends) == 1 and clock.marks["llm1"] >= ends[0]
