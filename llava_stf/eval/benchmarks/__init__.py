"""The benchmark registry: one small declarative module per benchmark (``Benchmark`` specs, see ``base``).

Adding a benchmark is one module plus one entry here. ``get_benchmark`` fails with the list of valid names.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from .base import Benchmark, Options, Result
from .gqa import GQA
from .mmbench import MMBENCH, MMBENCH_CN
from .mme import MME
from .pope import POPE
from .sqa import SQA
from .synthetic import SYNTHETIC
from .textvqa import TEXTVQA
from .vizwiz import VIZWIZ
from .vqa import VQA
from .vqav2 import VQAV2

# In the order of the paper's results table (MME last: reported separately, not in the average); then the
# generated world of ``llava_stf.data.synthetic`` (the demo's benchmark) and any question file of the user's own
# (``vqa``), neither a paper column.
BENCHMARKS: Mapping[str, Benchmark] = MappingProxyType(
    {b.name: b for b in (GQA, SQA, TEXTVQA, POPE, MMBENCH, MMBENCH_CN, VQAV2, VIZWIZ, MME, SYNTHETIC, VQA)}
)

# What ``--benchmark all`` runs: the paper's nine (the others have their own data and are asked for by name).
PAPER_BENCHMARKS: tuple[str, ...] = tuple(name for name in BENCHMARKS if name not in (SYNTHETIC.name, VQA.name))


def get_benchmark(name: str) -> Benchmark:
    """The benchmark registered as ``name``; an unknown name lists the valid ones."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; valid benchmarks: {', '.join(BENCHMARKS)}") from None


__all__ = ["BENCHMARKS", "PAPER_BENCHMARKS", "SYNTHETIC", "VQA", "Benchmark", "Options", "Result", "get_benchmark"]
