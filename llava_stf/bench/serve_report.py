"""The load test's tables: the served levels, the engine alone, and the JSON record (``bench.serve``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .serve_engine import EngineLevel
from .serve_load import Level
from .serve_targets import ceilings, engine_ratios, targets


@dataclass
class Run:
    """One checkpoint's levels."""

    path: Path
    model_id: str
    projector: str | None
    levels: list[Level]
    consistent: bool  # each question got the same answer at every level (and from the engine alone)
    engine: list[EngineLevel] = field(default_factory=list)  # the engine alone, batch sizes = the levels
    prompt_tokens: int | None = None  # per request, image tokens included (usage of one request)
    image_tokens: int | None = None


def table(runs: Sequence[Run]) -> str:
    header = ["model", "projector", "conc", "requests", "req/s", "p50 lat s", "p99 lat s", "p50 TTFT s", "errors"]
    header += ["1 answer each", "mean batch", "busy", "CPU ms/req server+clients"]
    rows = [header]
    for run in runs:
        for level in run.levels:
            rows.append(
                [
                    run.model_id,
                    run.projector or "?",
                    str(level.concurrency),
                    f"{len(level.done)}/{len(level.outcomes)}",
                    f"{level.rps:.2f}",
                    f"{level.latency(0.5):.3f}",
                    f"{level.latency(0.99):.3f}",
                    f"{level.ttft(0.5):.3f}",
                    str(level.errors),
                    "yes" if level.one_answer_each else "NO",
                    f"{level.mean_batch:.1f}",
                    f"{level.busy:.0%}",
                    _cpu(level),
                ]
            )
    return _columns(rows)


def _columns(rows: list[list[str]]) -> str:
    """Rows of cells as left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def engine_table(runs: Sequence[Run], threads: int) -> str:
    """The engine alone: milliseconds per request at each batch size, and the speed-up over the smallest batch."""
    rows = [["model", "projector", "batch", "ms/request", f"vs batch {runs[0].engine[0].batch}"]]
    for run in runs:
        for level in run.engine:
            speedup = run.engine[0].ms_per_request / level.ms_per_request if level.ms_per_request else 0.0
            rows.append(
                [run.model_id, run.projector or "?", str(level.batch), f"{level.ms_per_request:.2f}", f"{speedup:.2f}x"]
            )
    title = f"engine alone (ServeEngine.run in this process, {threads} torch thread(s), no HTTP or client CPU):"
    return title + "\n" + _columns(rows)


def _cpu(level: Level) -> str:
    n = max(len(level.outcomes), 1)
    server = "?" if level.server_cpu is None else f"{1000 * level.server_cpu / n:.1f}"
    return f"{server}+{1000 * level.client_cpu / n:.1f}"


def load_text(values: tuple[float, float, float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def record(runs: Sequence[Run], before, after) -> dict:
    return {
        "load_before": before,
        "load_after": after,
        "targets": targets(runs),
        "engine_ratios": engine_ratios(runs),
        "ceilings": ceilings(runs),
        "runs": [
            {
                "model_id": r.model_id,
                "path": str(r.path),
                "projector": r.projector,
                "consistent": r.consistent,
                "prompt_tokens": r.prompt_tokens,
                "image_tokens": r.image_tokens,
                "engine": [{"batch": e.batch, "ms_per_request": e.ms_per_request} for e in r.engine],
                "levels": [
                    {
                        "concurrency": lv.concurrency,
                        "requests": len(lv.outcomes),
                        "rps": lv.rps,
                        "p50_latency": lv.latency(0.5),
                        "p99_latency": lv.latency(0.99),
                        "p50_ttft": lv.ttft(0.5),
                        "errors": lv.errors,
                        "one_answer_each": lv.one_answer_each,
                        "mean_batch": lv.mean_batch,
                        "busy": lv.busy,
                        "server_cpu_s": lv.server_cpu,
                        "client_cpu_s": lv.client_cpu,
                    }
                    for lv in r.levels
                ],
            }
            for r in runs
        ],
    }


__all__ = ["Run", "engine_table", "load_text", "record", "table"]
