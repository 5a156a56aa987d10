"""Results files, the paper-style table and the stdlib .xlsx writer."""

from __future__ import annotations

import zipfile

import pytest

from llava_stf.eval.results import PAPER_ROWS, average, format_table, load_results, table_row, update_results
from llava_stf.eval.xlsx import column_letter, write_xlsx


def test_paper_rows_reproduce_the_papers_average() -> None:
    # The LLaVA-STF paper prints Avg 65.5 (LLaVA-1.5) and 66.3 (MBTF + STF), the mean of the 8 scores without MME.
    assert average(PAPER_ROWS["LLaVA-1.5-7B (paper)"]) == (pytest.approx(65.5, abs=0.05), 8)
    assert average(PAPER_ROWS["LLaVA-STF-7B (paper)"]) == (pytest.approx(66.3, abs=0.05), 8)


def test_table_marks_partial_averages() -> None:
    table = format_table([("mine", {"GQA": 60.0, "POPE": 80.0, "MME-P": 1400.0}), *PAPER_ROWS.items()])
    lines = table.splitlines()
    assert lines[0] == "| model | GQA | SQA | VQA-T | POPE | MMB | MMB-CN | VQAv2 | VizWiz | Avg | MME-P |"
    assert lines[2] == "| mine | 60.0 | — | — | 80.0 | — | — | — | — | 70.0* | 1400.0 |"
    assert lines[3].startswith("| LLaVA-1.5-7B (paper) | 62.0 |") and "| 65.5 |" in lines[3]
    assert lines[-1].startswith("* mean of the columns present only")


def test_update_results_keeps_other_benchmarks(tmp_path) -> None:
    path = tmp_path / "m" / "results.json"
    update_results(path, "gqa", {"column": "GQA", "headline": 61.0}, model_id="m")
    update_results(path, "vqav2", {"column": "VQAv2", "headline": None})
    update_results(path, "pope", {"column": "POPE", "headline": 85.0})
    data = load_results(path)
    assert data["model_id"] == "m" and set(data["benchmarks"]) == {"gqa", "vqav2", "pope"}
    assert table_row(data) == {"GQA": 61.0, "POPE": 85.0}


def test_column_letters() -> None:
    assert [column_letter(i) for i in (0, 25, 26, 701, 702)] == ["A", "Z", "AA", "ZZ", "AAA"]


def test_xlsx_holds_the_table(tmp_path) -> None:
    path = tmp_path / "up.xlsx"
    write_xlsx(path, ["index", "prediction"], [[7, "B <b> & \x0fc"], [8, None]])
    with zipfile.ZipFile(path) as archive:
        assert "xl/workbook.xml" in archive.namelist()
        sheet = archive.read("xl/worksheets/sheet1.xml").decode()
    assert '<c r="A2"><v>7</v></c>' in sheet
    assert "B &lt;b&gt; &amp; c</t>" in sheet  # escaped, control character dropped
    assert '<row r="3"><c r="A3"><v>8</v></c></row>' in sheet  # None: no cell
    openpyxl = pytest.importorskip("openpyxl")  # when installed, read it back as upstream's pandas would
    rows = list(openpyxl.load_workbook(path).active.iter_rows(values_only=True))
    assert rows == [("index", "prediction"), (7, "B <b> & c"), (8, None)]
