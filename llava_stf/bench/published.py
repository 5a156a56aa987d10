"""Published LLaVA-1.5-7B scores of the token reducers at 192 / 128 / 64 image tokens, and of the vanilla model (576).

Columns: GQA, MMBench (MMB), MME (**perception + cognition**, out of 2800), POPE (F1), ScienceQA-IMG (SQA), VQAv2,
TextVQA. Sources, as printed in the papers (training-free, on the released LLaVA-1.5-7B):

- vanilla, FastV, SparseVLM, VisionZip: VisionZip (Yang et al., arXiv 2412.04467), Table 1;
- PDrop (PyramidDrop), HiRED, DART: DART (Wen et al., arXiv 2502.11494), Table 1.

Caveats that travel with these numbers: FastV's are disputed (its official code gives VQAv2 74.06 at 128 tokens where
61.8 is reported; github.com/Gumpest/SparseVLMs issue #12); PDrop's differ between papers (the numbers here are
DART's); papers mix MME perception-only and perception + cognition (github.com/Cooperx521/PyramidDrop issue #10):
here MME is always P + C, and ``bench.compare`` reports our MME the same way (``comparable_score``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

COLUMNS = ("GQA", "MMB", "MME", "POPE", "SQA", "VQAv2", "TextVQA")
VANILLA_TOKENS = 576  # LLaVA-1.5-7B's image tokens (24 x 24 patches)
BUDGETS = (192, 128, 64)

# Our benchmark registry names (llava_stf.eval.benchmarks) -> the published column.
BENCHMARK_COLUMNS: Mapping[str, str] = {
    "gqa": "GQA",
    "mmbench": "MMB",
    "mme": "MME",
    "pope": "POPE",
    "sqa": "SQA",
    "scienceqa": "SQA",
    "scienceqa-img": "SQA",
    "vqav2": "VQAv2",
    "textvqa": "TextVQA",
}

# Our reducer registry names (llava_stf.model.reducers.REDUCERS) -> the method's name in the tables.
METHODS: Mapping[str, str] = {
    "fastv": "FastV",
    "sparsevlm": "SparseVLM",
    "visionzip": "VisionZip",
    "pyramiddrop": "PDrop",
    "hired": "HiRED",
    "dart": "DART",
}

_VANILLA = "61.9/64.7/1862/85.9/69.5/78.5/58.2"
_TABLE = {  # method: (at 192, at 128, at 64), each GQA/MMB/MME/POPE/SQA/VQAv2/TextVQA
    "FastV": ("52.7/61.2/1612/64.8/67.3/67.1/52.5", "49.6/56.1/1490/59.6/60.2/61.8/50.6",
              "46.1/48.0/1256/48.0/51.1/55.0/47.8"),
    "SparseVLM": ("57.6/62.5/1721/83.6/69.1/75.6/56.1", "56.0/60.0/1696/80.5/67.1/73.8/54.9",
                  "52.7/56.2/1505/75.1/62.2/68.2/51.8"),
    "VisionZip": ("59.3/63.0/1782.6/85.3/68.9/76.8/57.3", "57.6/62.0/1761.7/83.2/68.9/75.6/56.8",
                  "55.1/60.1/1690/77.0/69.0/72.4/55.5"),
    "PDrop": ("57.1/63.2/1766/82.3/68.8/75.1/56.1", "56.0/61.1/1644/82.3/68.3/72.9/55.1",
              "41.9/33.3/1092/55.9/68.6/69.2/45.9"),
    "HiRED": ("58.7/62.8/1737/82.8/68.4/74.9/47.4", "57.2/61.5/1710/79.8/68.1/73.4/46.1",
              "54.6/60.2/1599/73.6/68.2/69.7/44.2"),
    "DART": ("60.0/63.6/1856/82.8/69.8/76.7/57.4", "58.7/63.2/1840/80.1/69.1/75.9/56.4",
             "55.9/60.6/1765/73.9/69.8/72.4/54.4"),
}  # fmt: skip


def _row(cells: str) -> dict[str, float]:
    return dict(zip(COLUMNS, (float(c) for c in cells.split("/")), strict=True))


# {method: {image tokens: {column: score}}}; "vanilla" at 576.
PUBLISHED: Mapping[str, Mapping[int, Mapping[str, float]]] = {
    "vanilla": {VANILLA_TOKENS: _row(_VANILLA)},
    **{method: {b: _row(c) for b, c in zip(BUDGETS, cells, strict=True)} for method, cells in _TABLE.items()},
}


def published_score(reducer: str, tokens: int | None, benchmark: str) -> float | None:
    """The published LLaVA-1.5-7B score of ``reducer`` (a registry name, or ``"none"``) at ``tokens`` image tokens on
    ``benchmark`` (our registry name); ``None`` where the tables have none (``"none"`` only at 576 tokens)."""
    column = BENCHMARK_COLUMNS.get(benchmark)
    method = "vanilla" if reducer == "none" else METHODS.get(reducer)
    if column is None or method is None or tokens is None:
        return None
    return PUBLISHED[method].get(tokens, {}).get(column)


def comparable_score(
    benchmark: str, metrics: Mapping[str, Any], headline: float | None, headline_metric: str | None
) -> tuple[float | None, str]:
    """``(score, its name)`` of one of our results, in the published tables' convention.

    MME: perception + cognition (our headline is perception only, as the LLaVA papers print it); ``None`` unless
    both totals are there. Every other benchmark: its headline.
    """
    if benchmark == "mme":
        p, c = metrics.get("perception"), metrics.get("cognition")
        return (p + c if p is not None and c is not None else None), "perception+cognition"
    return headline, headline_metric or "score"


__all__ = ["BENCHMARK_COLUMNS", "BUDGETS", "COLUMNS", "METHODS", "PUBLISHED", "comparable_score", "published_score"]
