"""``bench.compare``'s outputs: one row per (checkpoint, reducer, budget) as CSV, a Markdown table and a PNG plot.

The plot (matplotlib, Agg backend) has three panels, accuracy against paper-convention TFLOPs, against measured
prefill milliseconds and against KV-cache MB per image; one colour and marker per reducer, one line per checkpoint
and reducer over its budgets (line style per checkpoint); rows without a local score are left out of the plot.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One checkpoint under one reducer and budget."""

    checkpoint: str  # the checkpoint folder's name
    model_id: str  # the eval's model id (answers and results are filed under it)
    reducer: str  # registry name, or "none"
    budget: int | None  # --tokens; None: the reducer's own count (none, adaptive reducers)
    kwargs: dict[str, Any]  # the reducer's resolved settings
    image_tokens: float  # image tokens entering the LLM (measured mean for adaptive reducers)
    equivalent_tokens: float  # image tokens averaged over the LLM's layers (in-LLM reducers drop inside)
    text_tokens: float  # mean prompt tokens besides the image over the questions evaluated
    questions: int  # questions evaluated
    accuracy: float | None  # the benchmark's score (None: no local score)
    metric: str  # what the score is
    published: float | None  # the method's published LLaVA-1.5-7B score at this budget (--published)
    paper_tflops: float  # LLM over the image tokens only
    prefill_tflops: float  # the whole prefill of one image and its prompt
    prefill_ms: float | None  # measured, median over the latency sample
    llm_ms: float | None  # the LLM's part of it
    kv_mb: float | None  # KV cache per image (MiB), image and prompt tokens over all layers
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Skip:
    checkpoint: str
    reducer: str
    budget: int | None
    reason: str


def label(reducer: str, budget: int | None) -> str:
    return reducer if budget is None else f"{reducer}@{budget}"


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    names = [f for f in Row.__dataclass_fields__ if f != "notes"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for row in rows:
            values = {k: v for k, v in asdict(row).items() if k in names}
            values["kwargs"] = json.dumps(row.kwargs, sort_keys=True)
            writer.writerow({k: "" if v is None else v for k, v in values.items()})


def markdown(rows: Sequence[Row], skips: Sequence[Skip], header: Sequence[str], published: bool) -> str:
    """The table: one row per (checkpoint, reducer, budget), then the skipped combinations with their reasons."""
    unit, scale = flops_unit(max((r.paper_tflops for r in rows), default=1.0))
    cols = ["checkpoint", "reducer", "budget", "image tok (LLM in / layer avg)", "text tok", "score"]
    cols += ["published (7B)"] * published + [f"paper {unit}", f"prefill {unit}", "prefill ms", "LLM ms", "KV MB/image"]
    lines = [*header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r.checkpoint, r.reducer, "—" if r.budget is None else str(r.budget)]
        cells += [f"{r.image_tokens:.1f} / {r.equivalent_tokens:.1f}", f"{r.text_tokens:.1f}", _num(r.accuracy)]
        cells += [_num(r.published)] * published
        cells += [f"{r.paper_tflops * scale:.4g}", f"{r.prefill_tflops * scale:.4g}"]
        cells += [_num(r.prefill_ms, 2), _num(r.llm_ms, 2)]
        cells += [_num(r.kv_mb, 3)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({f"{r.checkpoint} {label(r.reducer, r.budget)}: {n}" for r in rows for n in r.notes})
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    lines += ["", f"Skipped: {len(skips)}"]
    lines += [f"- {s.checkpoint} {label(s.reducer, s.budget)}: {s.reason}" for s in skips]
    return "\n".join(lines) + "\n"


def flops_unit(tflops: float) -> tuple[str, float]:
    """The largest of TFLOPs / GFLOPs / MFLOPs in which ``tflops`` is at least 1, and its factor from TFLOPs."""
    for unit, factor in (("TFLOPs", 1.0), ("GFLOPs", 1e3), ("MFLOPs", 1e6)):
        if tflops * factor >= 1:
            return unit, factor
    return "FLOPs", 1e12


def plot(path: Path, rows: Sequence[Row], title: str, metric: str) -> None:
    """The three-panel PNG (accuracy vs paper TFLOPs, prefill ms, KV MB per image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    reducers = list(dict.fromkeys(r.reducer for r in rows))
    checkpoints = list(dict.fromkeys(r.checkpoint for r in rows))
    colors = plt.get_cmap("tab10")
    markers, styles = "os^Dv<>pPX*h", ["-", "--", ":", "-."]
    style = {c: styles[i % len(styles)] for i, c in enumerate(checkpoints)}
    others = [name for name in reducers if name != "none"]
    look = {name: (colors(i % 10), markers[i % len(markers)]) for i, name in enumerate(others)}
    look |= {"none": ("black", "*")} if "none" in reducers else {}  # the unreduced model: on top, unmistakable
    unit, scale = flops_unit(max((r.paper_tflops for r in rows), default=1.0))
    panels = [
        ("paper_tflops", scale, f"{unit} (LLM over the image tokens, paper convention)"),
        ("prefill_ms", 1.0, "measured prefill (ms, median)"),
        ("kv_mb", 1.0, "KV cache per image (MB)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, (key, factor, xlabel) in zip(axes, panels):
        for ckpt in checkpoints:
            for name in reducers:
                points = sorted(
                    (getattr(r, key) * factor, r.accuracy)
                    for r in rows
                    if r.checkpoint == ckpt and r.reducer == name and r.accuracy is not None
                    and getattr(r, key) is not None
                )  # fmt: skip
                if points:
                    color, marker = look[name]
                    top = name == "none"
                    ax.plot(*zip(*points), linestyle=style[ckpt], color=color, marker=marker,
                            markersize=11 if top else 6, zorder=3 if top else 2)  # fmt: skip
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, marker=m, linestyle="", label=n) for n, (c, m) in look.items()]
    handles += [Line2D([], [], color="gray", linestyle=style[c], label=c) for c in checkpoints]
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(0.875, 0.5), fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(
    out: Path, rows: Sequence[Row], skips: Sequence[Skip], header: Sequence[str], settings: dict, published: bool
) -> list[Path]:
    """``compare.csv``, ``compare.md``, ``compare.png`` and ``compare.json`` (rows, skips, settings) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"compare.{ext}" for ext in ("csv", "md", "png", "json")]
    write_csv(paths[0], rows)
    paths[1].write_text(markdown(rows, skips, header, published), encoding="utf-8")
    metric = rows[0].metric if rows else "score"
    plot(paths[2], rows, header[0].lstrip("# ") if header else "", metric)
    record = {"settings": settings, "rows": [asdict(r) for r in rows], "skipped": [asdict(s) for s in skips]}
    paths[3].write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    return paths


__all__ = ["Row", "Skip", "label", "markdown", "plot", "write_all", "write_csv"]
