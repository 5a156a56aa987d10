"""``python -m llava_stf.bench.compare`` on an AnyRes (LLaVA-NeXT) checkpoint: per-crop budgets, per-image counts.

A tiny NeXT checkpoint (56-px crops, ``mlp2x_gelu``: 64 tokens per crop, a 4-layer LLM so FastV's K = 2 drops) and
images of different sizes (112x112: 5 crops, 336 tokens unreduced; 40x90: 3 crops, 208). The latency sample is the
first and the last question (images 0 and 1), so the measured image tokens and KV cache have exact expected values.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from llava_stf.bench import compare
from llava_stf.flops import count_flops
from llava_stf.generation import Generator, Request
from llava_stf.loading import load_config
from llava_stf.model import LlavaStfNextConfig, LlavaStfNextForConditionalGeneration
from llava_stf.testing import (
    IMAGE_TOKEN,
    TINY_NEXT_CROP,
    TINY_NEXT_PATCH,
    TINY_PINPOINTS,
    make_image,
    tiny_next_processor,
    tiny_text_config,
    tiny_tokenizer,
    tiny_vision_config,
)

TEXT = "What is shown?"
SIZES = [(112, 112), (40, 90), (90, 40)]  # (width, height) of images 0, 1, 2
SAMPLE_SIZES = [(112, 112), (90, 40)]  # (height, width) of the latency sample: images 0 and 1
KV_WIDTH, FP32 = 16 * 2, 4  # tiny LLM: head_dim 16, 2 key/value heads; float32


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare_next")
    tokenizer = tiny_tokenizer()
    config = LlavaStfNextConfig(
        vision_config=tiny_vision_config(image_size=TINY_NEXT_CROP, patch_size=TINY_NEXT_PATCH),
        text_config=tiny_text_config(len(tokenizer), num_hidden_layers=4),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_type="mlp2x_gelu",
        image_grid_pinpoints=TINY_PINPOINTS,
    )
    torch.manual_seed(0)
    LlavaStfNextForConditionalGeneration(config).eval().save_pretrained(root / "next")
    tiny_next_processor(config, tokenizer).save_pretrained(root / "next")
    questions = [{"question_id": i, "image": f"{i % 3}.png", "text": TEXT} for i in range(5)]
    for i, size in enumerate(SIZES):
        make_image(i, size).save(root / f"{i}.png")
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (root / "gt.jsonl").write_text("".join(json.dumps({"question_id": i, "answer": "red"}) + "\n" for i in range(5)))
    return root


def _compare(root: Path) -> int:
    argv = ["--model-path", str(root / "next"), "--benchmark", "vqa", "--questions", str(root / "q.jsonl"),
            "--ground-truth", str(root / "gt.jsonl"), "--data-root", str(root), "--out", str(root / "out"),
            "--reducers", "none", "visionzip", "fastv", "prumerge", "--tokens", "8", "100", "--max-new-tokens", "2",
            "--batch-size", "5", "--latency-samples", "2", "--repeats", "1", "--device", "cpu",
            "--no-progress"]  # fmt: skip
    return compare.main(argv)


def _text_tokens(root: Path) -> int:
    generator = Generator(*compare.load_checkpoint(root / "next", "cpu"))
    prompt = generator.prompt(Request.single(TEXT, make_image(0)))
    return len(generator.processor.encode_prompt(prompt, image_tokens=[1])) - 1


def test_compare_sweeps_an_anyres_checkpoint(world, capsys):
    assert _compare(world) == 0
    with (world / "out" / "compare.csv").open() as f:
        rows = {(r["reducer"], r["budget"]): r for r in csv.DictReader(f)}
    assert sorted(rows) == [("fastv", "8"), ("none", ""), ("visionzip", "8")]
    none, zipped, fastv = rows["none", ""], rows["visionzip", "8"], rows["fastv", "8"]
    # the latency sample's images 0 and 1: 336 and 208 tokens unreduced, 5 x 8 and 3 x 8 with VisionZip
    assert float(none["image_tokens"]) == float(fastv["image_tokens"]) == (336 + 208) / 2
    assert float(zipped["image_tokens"]) == float(zipped["equivalent_tokens"]) == (40 + 24) / 2
    assert float(none["equivalent_tokens"]) == 272
    assert float(fastv["equivalent_tokens"]) == (2 * 336 + 2 * 42 + 2 * 208 + 2 * 26) / 8  # per image, then mean
    text = _text_tokens(world)
    per_token = 2 * KV_WIDTH * FP32
    assert float(none["kv_mb"]) * 2**20 == pytest.approx(sum(4 * (n + text) for n in (336, 208)) / 2 * per_token)
    assert float(zipped["kv_mb"]) * 2**20 == pytest.approx(sum(4 * (n + text) for n in (40, 24)) / 2 * per_token)
    fastv_kv = sum(2 * (n + text) + 2 * (n // 8 + text) for n in (336, 208)) / 2 * per_token  # keeps n / 8 after 2
    assert float(fastv["kv_mb"]) * 2**20 == pytest.approx(fastv_kv)
    assert all(r["accuracy"] != "" and float(r["prefill_ms"]) > 0 for r in rows.values())
    assert zipped["model_id"] == none["model_id"] + "+visionzip@8"
    md = (world / "out" / "compare.md").read_text()
    assert "- next prumerge: reducer_type 'prumerge' gives each crop its own adaptive token count" in md
    assert "- next visionzip@100: token budget 100 for reducer_type 'visionzip' must be an integer in 1..64" in md
    assert "AnyRes: no latency sample" not in md
    # FLOPs: the mean over the latency sample's two images, each at its own size (crops and tokens)
    config = load_config(world / "next")
    text_tokens = round(float(none["text_tokens"]))
    expected = [count_flops(config, text_tokens, image_size=size) for size in SAMPLE_SIZES]
    assert float(none["paper_tflops"]) * 1e12 == pytest.approx(sum(r.paper for r in expected) / 2, rel=1e-6)
    assert "3 rows, 3 skipped" in capsys.readouterr().out
    assert (world / "out" / "compare.png").read_bytes()[:4] == b"\x89PNG"
