"""The projector comparison on a micro budget writes its CSV, Markdown table and a PNG that opens."""

from __future__ import annotations

import csv

import pytest
from PIL import Image

from llava_stf.data.synthetic import FAMILIES
from llava_stf.demo.__main__ import main


@pytest.mark.slow
def test_compare_writes_table_csv_and_plot(demo_out, tmp_path, capsys) -> None:
    results = tmp_path / "results"
    argv = ["compare", "--fast", "--out", str(demo_out), "--results", str(results), "--no-progress",
            "--projectors", "mlp2x_gelu", "mbtf_stf", "--seeds", "0", "1",
            "--reducers", "pool", "visionzip"]  # fmt: skip
    assert main(argv) == 0
    rows = list(csv.DictReader((results / "results.csv").open()))
    assert [(r["projector"], r["seed"]) for r in rows] == [
        ("mlp2x_gelu", "0"), ("mlp2x_gelu", "1"), ("mbtf_stf", "0"), ("mbtf_stf", "1"),
        ("mlp2x_gelu+pool@16", "0"), ("mlp2x_gelu+visionzip@16", "0"),
        ("mlp2x_gelu+pool@16", "1"), ("mlp2x_gelu+visionzip@16", "1"),
    ]  # fmt: skip
    reduced = [r for r in rows if "+" in r["projector"]]  # the trained mlp2x_gelu checkpoints, 16 tokens kept
    assert {r["visual_tokens"] for r in reduced} == {"16"}
    assert all(0.0 <= float(r[k]) <= 100.0 for r in reduced for k in ("accuracy", "blank_accuracy"))
    assert all(int(r["llm_visual_flops"]) < int(rows[0]["llm_visual_flops"]) for r in reduced)
    answers = demo_out / "synthetic" / "eval" / "model_answers"
    assert (answers / "mlp2x_gelu-seed0-fast+visionzip@16.jsonl").is_file()  # its own answers, not the base's
    assert {r["visual_tokens"] for r in rows if r["projector"] == "mlp2x_gelu"} == {"64"}
    assert {r["visual_tokens"] for r in rows if r["projector"] == "mbtf_stf"} == {"16"}
    assert all(0.0 <= float(r[k]) <= 100.0 for r in rows for k in ("accuracy", "blank_accuracy"))
    # 4x the visual tokens costs the LLM more (the full prefill of these tiny models is dominated by the towers).
    assert int(rows[0]["llm_visual_flops"]) > 3 * int(rows[2]["llm_visual_flops"]) > 0
    table = (results / "results.md").read_text()
    assert "| mlp2x_gelu | 64 |" in table and "| mbtf_stf | 16 |" in table and "over 2 seed(s)" in table
    assert "One LLM" not in table  # --fast pre-trains one LLM per seed (DemoSettings.llm_seed None)
    assert all(f" {f} " in table.splitlines()[0] for f in FAMILIES) and " detail " not in table.splitlines()[0]
    probed = table.split("What the image tokens carry")[1]  # trained rows only: reducers keep no token grid
    assert "| mlp2x_gelu | 64 |" in probed and "| mbtf_stf | 16 |" in probed and "+pool" not in probed
    assert "object colour | object shape |" in probed and "dot" not in probed.splitlines()[2]
    assert all(0.0 <= float(r["probe_color"]) <= 100.0 for r in rows if "+" not in r["projector"])
    assert all(r["probe_color"] == "" for r in reduced)
    assert (demo_out / "mbtf_stf-seed1-fast" / "token_probe.json").is_file()  # kept with its checkpoint
    control = table.split("Blank-image control")[1]  # its own table, one row per projector
    assert "| mlp2x_gelu | 64 |" in control and "| mbtf_stf | 16 |" in control
    with Image.open(results / "results.png") as image:
        image.load()
        assert image.size[0] > 500 and image.size[1] > 200
    out = capsys.readouterr().out
    assert "mbtf_stf seed 1" in out and "mlp2x_gelu seed 1 + visionzip at 16 tokens" in out
    assert "| mlp2x_gelu+visionzip@16 | 16 |" in table and "training-free token reducer" in table
    paired = table.split("Paired difference")[1].split("Blank-image control")[0]  # per seed against mlp2x_gelu
    assert "| mbtf_stf | " in paired and " | 2 |" in paired and "| mlp2x_gelu | " not in paired


def test_compare_reducers_need_the_uncompressed_runs(tmp_path, capsys) -> None:
    argv = ["compare", "--fast", "--out", str(tmp_path), "--projectors", "mbtf_stf", "--reducers", "pool"]
    assert main(argv) == 1
    assert "error: --reducers reduce the mlp2x_gelu checkpoints" in capsys.readouterr().err
    assert main(["compare", "--fast", "--out", str(tmp_path), "--reducer-tokens", "0"]) == 1
    assert "--reducer-tokens must be at least 1" in capsys.readouterr().err
    assert main(["compare", "--fast", "--out", str(tmp_path), "--reducers", "pool", "tome"]) == 1
    assert "error: unknown --reducers tome; valid reducers: dart, divprune" in capsys.readouterr().err
    assert main(["compare", "--fast", "--out", str(tmp_path), "--jobs", "0"]) == 1
    assert capsys.readouterr().err.strip() == "error: --jobs must be at least 1, got 0"
    assert not (tmp_path / "compare").exists()  # refused before any work


@pytest.mark.slow
def test_runs_side_by_side_give_what_one_after_the_other_gives(tmp_path, monkeypatch, capsys) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker runs: the comparison is of the processes, not of thread counts
    monkeypatch.setattr("os.cpu_count", lambda: 2)  # two one-thread workers whatever this machine has
    try:
        tables = []
        for jobs in ("2", "1"):
            results = tmp_path / f"results{jobs}"
            argv = ["compare", "--fast", "--out", str(tmp_path / f"out{jobs}"), "--results", str(results),
                    "--no-progress", "--projectors", "mlp2x_gelu", "stf", "--seeds", "0", "1", "--reducers", "pool",
                    "--jobs", jobs]  # fmt: skip
            assert main(argv) == 0
            tables.append((results / "results.csv").read_text())
    finally:
        torch.set_num_threads(threads)
    assert tables[0] == tables[1] and tables[0].count("\n") == 7  # 4 runs + 2 reduced rows + the header
    out = capsys.readouterr().out
    assert "== 4 runs, 2 at a time (1 thread(s) each)" in out and out.count("== done ") == 4
    assert (tmp_path / "out2" / "stf-seed1-fast" / "token_probe.json").is_file()  # written by a worker
