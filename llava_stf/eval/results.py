"""Results files and tables: ``<results-dir>/<model id>/results.json`` and the paper-style comparison table.

Each evaluated benchmark adds an entry (headline number, all metrics, files written, notes, and the provenance of
its answers) to the model's ``results.json`` under the key ``<benchmark>/<split>``, so two splits never overwrite
each other; server-scored splits get their number with ``--record NAME=SCORE``. A results file holds the results of
one checkpoint (``model_digest``): when another checkpoint is evaluated under the same model id, the earlier
checkpoint's entries move to ``superseded[<its digest>]`` and leave the table. ``format_table`` lays models side by
side in the columns of the LLaVA-STF paper's tables (GQA, SQA, VQA-T, POPE, MMB, MMB-CN, VQAv2, VizWiz, Avg; Avg is
the mean of those eight, MME-P is shown apart as in the papers), then any other column a model has (another split,
the demo's ``Synth``, a question file of one's own), optionally beside the published numbers.
"""

from __future__ import annotations

import fcntl
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .answers import write_text_atomic

AVERAGED_COLUMNS = ("GQA", "SQA", "VQA-T", "POPE", "MMB", "MMB-CN", "VQAv2", "VizWiz")
COLUMNS = (*AVERAGED_COLUMNS, "MME-P")
# Published 7B numbers: Table 2 of the LLaVA-STF paper (arXiv 2506.07138) for both rows; MME-P from
# haotian-liu/LLaVA docs/MODEL_ZOO.md (LLaVA-1.5) and the visresearch/LLaVA-STF README (LLaVA-STF).
PAPER_ROWS: Mapping[str, Mapping[str, float]] = {
    "LLaVA-1.5-7B (paper)": dict(zip(COLUMNS, (62.0, 66.8, 58.2, 85.9, 64.3, 58.3, 78.5, 50.0, 1510.7))),
    "LLaVA-STF-7B (paper)": dict(zip(COLUMNS, (61.9, 70.5, 57.4, 86.0, 66.2, 58.9, 78.1, 51.1, 1482.8))),
}


def results_file(results_dir: Path, model_id: str) -> Path:
    return results_dir / model_id / "results.json"


def load_results(path: Path) -> dict[str, Any]:
    """The results of one model (an empty skeleton when the file does not exist).

    Raises:
        ValueError: If the file is not a results file (naming it).
    """
    if not path.is_file():
        return {"benchmarks": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable results file ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), dict):
        raise ValueError(f"{path} is not a results file (no 'benchmarks' object)")
    return data


def update_results(path: Path, key: str, entry: Mapping[str, Any], **top_level: Any) -> dict[str, Any]:
    """Set ``benchmarks[key] = entry`` in ``path`` (locked read-modify-write, atomic replace).

    ``top_level`` fields are set too; a ``model_digest`` other than the file's moves the file's entries to
    ``superseded[<old digest>]`` first, so ``benchmarks`` always holds one checkpoint's results.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(".results.lock"), "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        data = load_results(path)
        old, new = data.get("model_digest"), top_level.get("model_digest")
        if old is not None and new is not None and old != new and data["benchmarks"]:
            data.setdefault("superseded", {})[old] = data["benchmarks"]
            data["benchmarks"] = {}
        data.update(top_level)
        data["benchmarks"][key] = dict(entry)
        write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=True) + "\n")
    return data


def table_row(results: Mapping[str, Any]) -> dict[str, float | None]:
    """``{column: headline}`` of one model's results (columns without a number are left out)."""
    row = {}
    for entry in results.get("benchmarks", {}).values():
        if entry.get("headline") is not None:
            row[entry["column"]] = entry["headline"]
    return row


def average(row: Mapping[str, float | None]) -> tuple[float | None, int]:
    """Mean over the eight averaged columns present in ``row``, and how many were present."""
    values = [row[c] for c in AVERAGED_COLUMNS if row.get(c) is not None]
    return (sum(values) / len(values) if values else None), len(values)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.1f}"


def format_table(rows: Sequence[tuple[str, Mapping[str, float | None]]]) -> str:
    """A Markdown table: one row per model, the paper's columns, Avg (marked ``*`` when columns are missing), then
    every other column some row has (first seen first)."""
    extra = list(dict.fromkeys(c for _, row in rows for c in row if c not in COLUMNS))
    header = ["model", *AVERAGED_COLUMNS, "Avg", "MME-P", *extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    partial = False
    for name, row in rows:
        mean, count = average(row)
        star = "*" if mean is not None and count < len(AVERAGED_COLUMNS) else ""
        partial |= bool(star)
        cells = [name, *(_fmt(row.get(c)) for c in AVERAGED_COLUMNS), _fmt(mean) + star, _fmt(row.get("MME-P"))]
        cells += [_fmt(row.get(c)) for c in extra]
        lines.append("| " + " | ".join(cells) + " |")
    if partial:
        lines.append(f"* mean of the columns present only (the paper's Avg is over all {len(AVERAGED_COLUMNS)})")
    return "\n".join(lines)


__all__ = [
    "AVERAGED_COLUMNS",
    "COLUMNS",
    "PAPER_ROWS",
    "average",
    "format_table",
    "load_results",
    "results_file",
    "table_row",
    "update_results",
]
