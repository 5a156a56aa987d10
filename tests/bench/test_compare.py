"""``python -m llava_stf.bench.compare``: one row per (checkpoint, reducer, budget) with accuracy through the eval
engine, FLOPs, measured prefill and KV cache; skips counted with reasons; CSV / Markdown / PNG; reruns reuse answers.

Two tiny checkpoints: a per-patch one (mlp2x_gelu: 64 image tokens, 4 LLM layers, so FastV's K=2 really drops) and an
MBTF+STF one (16 tokens: vision-side reducers cannot run on it). Every question has the same text, so one text-token
count holds for every prompt and the KV cache can be checked against the analytic per-layer count.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from llava_stf.bench import compare
from llava_stf.bench.published import comparable_score, published_score
from llava_stf.generation import Generator, Request
from llava_stf.model import LlavaStfConfig, LlavaStfForConditionalGeneration
from llava_stf.testing import (
    make_image,
    save_tiny_checkpoint,
    tiny_processor,
    tiny_text_config,
    tiny_tokenizer,
    tiny_vision_config,
)

TEXT = "What is shown?"
KV_WIDTH, FP32 = 16 * 2, 4  # tiny LLM: head_dim 64 / 4 heads, 2 key/value heads; float32


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    tokenizer = tiny_tokenizer()
    config = LlavaStfConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config(len(tokenizer),
                            num_hidden_layers=4), image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                            projector_type="mlp2x_gelu")  # fmt: skip
    torch.manual_seed(0)
    LlavaStfForConditionalGeneration(config).eval().save_pretrained(root / "plain")
    tiny_processor(config, tokenizer).save_pretrained(root / "plain")
    save_tiny_checkpoint(root / "stf", "mbtf_stf")
    questions = [{"question_id": i, "image": f"{i % 3}.png", "text": TEXT} for i in range(5)]
    for i in range(3):
        make_image(i, (40 + 8 * i, 32)).save(root / f"{i}.png")
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (root / "gt.jsonl").write_text("".join(json.dumps({"question_id": i, "answer": "red"}) + "\n" for i in range(5)))
    return root


def _compare(root: Path, *extra: str) -> int:
    argv = ["--model-path", str(root / "plain"), str(root / "stf"), "--benchmark", "vqa", "--questions",
            str(root / "q.jsonl"), "--ground-truth", str(root / "gt.jsonl"), "--data-root", str(root), "--out",
            str(root / "out"), "--reducers", "none", "fastv", "prumerge", "--tokens", "8", "16", "100",
            "--max-new-tokens", "2", "--batch-size", "5", "--latency-samples", "2", "--repeats", "1",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    return compare.main([*argv, *extra])


def _rows(root: Path) -> dict[tuple[str, str, str], dict]:
    with (root / "out" / "compare.csv").open() as f:
        return {(r["checkpoint"], r["reducer"], r["budget"]): r for r in csv.DictReader(f)}


def _text_tokens(root: Path) -> int:
    model = LlavaStfForConditionalGeneration.from_pretrained(root / "plain")
    generator = Generator(model, compare.load_checkpoint(root / "plain", "cpu")[1])
    prompt = generator.prompt(Request.single(TEXT, make_image(0)))
    return len(generator.processor.encode_prompt(prompt, image_tokens=[1])) - 1


def test_rows_flops_kv_skips_and_outputs(world, capsys):
    assert _compare(world) == 0
    rows = _rows(world)
    assert sorted(rows) == sorted([("plain", "none", ""), ("plain", "fastv", "8"), ("plain", "fastv", "16"),
                                   ("plain", "prumerge", ""), ("stf", "none", ""), ("stf", "fastv", "8"),
                                   ("stf", "fastv", "16")])  # fmt: skip
    plain = {k[1:]: v for k, v in rows.items() if k[0] == "plain"}
    none, f8, f16 = plain["none", ""], plain["fastv", "8"], plain["fastv", "16"]
    for key in ("paper_tflops", "prefill_tflops", "equivalent_tokens"):  # fewer tokens, fewer FLOPs
        assert float(f8[key]) < float(f16[key]) < float(none[key])
    assert float(f16["equivalent_tokens"]) == (2 * 64 + 2 * 16) / 4  # layers 0-1: 64 image tokens, 2-3: 16
    text = _text_tokens(world)
    assert all(float(r["text_tokens"]) == text for r in rows.values())
    for row, layers in [(none, [64] * 4), (f8, [64, 64, 8, 8]), (f16, [64, 64, 16, 16])]:  # FastV's schedule
        assert float(row["kv_mb"]) * 2**20 == sum(n + text for n in layers) * 2 * KV_WIDTH * FP32
    merged = plain["prumerge", ""]
    assert 1 <= float(merged["image_tokens"]) < 64  # adaptive: the count measured on the sample's images
    expected = 4 * (float(merged["image_tokens"]) + text) * 2 * KV_WIDTH * FP32
    assert float(merged["kv_mb"]) * 2**20 == pytest.approx(expected)
    assert all(float(r["prefill_ms"]) > 0 and r["accuracy"] != "" for r in rows.values())
    assert none["model_id"].startswith("plain-") and f8["model_id"] == none["model_id"] + "+fastv@8"
    results = json.loads((world / "results" / f8["model_id"] / "results.json").read_text())  # the eval's own file
    assert results["reducer"] == {"type": "fastv", "kwargs": {"k": 2, "r": 0.875}}
    out = capsys.readouterr().out
    assert "7 rows, 3 skipped" in out
    md = (world / "out" / "compare.md").read_text()
    assert "Skipped: 3" in md and "- stf prumerge: reducer_type 'prumerge' passes a reduced set" in md
    assert "- plain fastv@100: token budget 100 for reducer_type 'fastv' must be an integer in 1..64" in md
    assert "- stf fastv@16: removes no image token on this checkpoint" in md  # 16 of 16: a no-op, said so
    assert (world / "out" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((world / "out" / "compare.json").read_text())["skipped"]) == 3


def test_rerun_reuses_every_answer(world, monkeypatch):
    if not (world / "out" / "compare.csv").is_file():
        assert _compare(world) == 0
    before = {k: r["accuracy"] for k, r in _rows(world).items()}
    monkeypatch.setattr(Generator, "generate", lambda *a, **k: pytest.fail("a rerun answers nothing again"))
    assert _compare(world) == 0
    assert {k: r["accuracy"] for k, r in _rows(world).items()} == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--model-path": ["missing"]}, "error: checkpoint folder not found: "),
        ({"--reducers": ["none", "bogus"]}, "error: unknown reducer_type 'bogus'; valid reducer types: ['dart', "),
        ({"--tokens": ["0"]}, "error: --tokens must be positive numbers of image tokens, got [0]"),
        ({"--benchmark": ["gqa2"]}, "error: unknown benchmark 'gqa2'; valid benchmarks: gqa"),
    ],
)
def test_mistakes_are_one_line(tmp_path, world, capsys, monkeypatch, change, message):
    monkeypatch.setattr(compare, "load_checkpoint", lambda *a, **k: pytest.fail("no model may be loaded"))
    argv = {
        "--model-path": [str(world / "plain")],
        "--benchmark": ["vqa"],
        "--questions": [str(world / "q.jsonl")],
        "--out": [str(tmp_path / "out")],
        "--reducers": ["none"],
        "--tokens": ["8"],
        "--device": ["cpu"],
    }
    argv.update({k: [str(tmp_path / v) if v == "missing" else v for v in vs] for k, vs in change.items()})
    assert compare.main([item for k, vs in argv.items() for item in (k, *vs)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(message) and "Traceback" not in err, err


def test_published_scores_match_our_benchmark_names():
    assert published_score("visionzip", 64, "gqa") == 55.1 and published_score("dart", 192, "textvqa") == 57.4
    assert published_score("none", 576, "mme") == 1862.0 and published_score("fastv", 128, "vqav2") == 61.8
    assert published_score("pyramiddrop", 64, "mmbench") == 33.3 and published_score("sparsevlm", 128, "sqa") == 67.1
    assert published_score("none", 144, "gqa") is None  # vanilla is 576 tokens only
    assert published_score("fastv", 64, "vqa") is None and published_score("prumerge", None, "gqa") is None
    assert comparable_score("mme", {"perception": 1500.0, "cognition": 350.0}, 1500.0, "perception") == (
        1850.0, "perception+cognition")  # fmt: skip
    assert comparable_score("mme", {"perception": 1500.0, "cognition": None}, 1500.0, "perception")[0] is None
    assert comparable_score("gqa", {"accuracy": 61.0}, 61.0, "accuracy") == (61.0, "accuracy")


def test_checkpoints_of_one_folder_name_keep_apart_in_the_table(tmp_path):
    a, b, c = tmp_path / "run-a" / "stage2", tmp_path / "run-b" / "stage2", tmp_path / "other"
    assert compare.checkpoint_names([a, b, c]) == {a: "run-a/stage2", b: "run-b/stage2", c: f"{tmp_path.name}/other"}
    assert compare.checkpoint_names([a, c]) == {a: "stage2", c: "other"}
