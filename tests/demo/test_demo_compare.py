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
            "--projectors", "mlp2x_gelu", "mbtf_stf", "--seeds", "0", "1"]  # fmt: skip
    assert main(argv) == 0
    rows = list(csv.DictReader((results / "results.csv").open()))
    assert [(r["projector"], r["seed"]) for r in rows] == [
        ("mlp2x_gelu", "0"), ("mlp2x_gelu", "1"), ("mbtf_stf", "0"), ("mbtf_stf", "1")
    ]  # fmt: skip
    assert {r["visual_tokens"] for r in rows if r["projector"] == "mlp2x_gelu"} == {"64"}
    assert {r["visual_tokens"] for r in rows if r["projector"] == "mbtf_stf"} == {"16"}
    assert all(0.0 <= float(r[k]) <= 100.0 for r in rows for k in ("accuracy", "blank_accuracy"))
    # 4x the visual tokens costs the LLM more (the full prefill of these tiny models is dominated by the towers).
    assert int(rows[0]["llm_visual_flops"]) > 3 * int(rows[2]["llm_visual_flops"]) > 0
    table = (results / "results.md").read_text()
    assert "| mlp2x_gelu | 64 |" in table and "| mbtf_stf | 16 |" in table and "over 2 seed(s)" in table
    assert all(f" {f} " in table.splitlines()[0] for f in FAMILIES)
    control = table.split("Blank-image control")[1]  # its own table, one row per projector
    assert "| mlp2x_gelu | 64 |" in control and "| mbtf_stf | 16 |" in control
    with Image.open(results / "results.png") as image:
        image.load()
        assert image.size[0] > 500 and image.size[1] > 200
    assert "mbtf_stf seed 1" in capsys.readouterr().out
