"""The load test's targets and what bounds them (``bench.serve``): requests/s at the highest concurrency over the
lowest, ``mbtf_stf`` over ``mlp2x_gelu``, the same ratios in the engine alone, and two ceilings that explain a miss."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .serve_report import Run

SCALING_TARGET = 4.0  # requests/s at the highest level over the lowest
PROJECTOR_TARGET = 1.5  # mbtf_stf over mlp2x_gelu at the highest level


def targets(runs: Sequence[Run]) -> list[str]:
    """The issue's targets, each ``meets`` or ``MISSES``."""
    lines = []
    for run in runs:
        low, high = run.levels[0], run.levels[-1]
        ratio = high.rps / low.rps if low.rps else 0.0
        verdict = "meets" if ratio >= SCALING_TARGET else "MISSES"
        lines.append(
            f"{run.model_id}: c{high.concurrency} / c{low.concurrency} requests/s = {ratio:.2f}x "
            f"(target >= {SCALING_TARGET:g}x): {verdict}"
        )
    if pair := _pair(runs):
        base, fast = pair[0].levels[-1], pair[1].levels[-1]
        ratio = fast.rps / base.rps if base.rps else 0.0
        verdict = "meets" if ratio >= PROJECTOR_TARGET else "MISSES"
        lines.append(
            f"mbtf_stf / mlp2x_gelu requests/s at c{fast.concurrency} = {ratio:.2f}x "
            f"(target >= {PROJECTOR_TARGET:g}x): {verdict}"
        )
    return lines


def engine_ratios(runs: Sequence[Run]) -> list[str]:
    """What the engine alone gives, beside the targets (not targets themselves: those are the served rates)."""
    lines = []
    for run in runs:
        if len(run.engine) > 1:
            low, high = run.engine[0], run.engine[-1]
            lines.append(
                f"{run.model_id}: engine alone, batch {high.batch} / batch {low.batch} requests/s = "
                f"{low.ms_per_request / high.ms_per_request:.2f}x"
            )
    if pair := _pair(runs, lambda run: bool(run.engine)):
        base, fast = pair[0].engine[-1], pair[1].engine[-1]
        lines.append(
            f"mbtf_stf / mlp2x_gelu engine alone requests/s at batch {fast.batch} = "
            f"{base.ms_per_request / fast.ms_per_request:.2f}x"
        )
    return lines


def ceilings(runs: Sequence[Run]) -> list[str]:
    """What bounds the targets on this machine: the clients' own CPU, and the LLM prompt tokens per request."""
    lines = []
    for run in runs:
        low, high = run.levels[0], run.levels[-1]
        if len(run.levels) < 2 or not high.outcomes or high.client_cpu <= 0 or not low.rps:
            continue
        ms = 1000 * high.client_cpu / len(high.outcomes)
        cap = 1000 / ms
        lines.append(
            f"{run.model_id}: the clients (asyncio tasks in this one process) used {ms:.1f} ms of CPU per request at "
            f"c{high.concurrency}: on one core they can send at most {cap:.0f} requests/s, "
            f"{cap / low.rps:.2f}x c{low.concurrency}"
        )
    if pair := _pair(runs, lambda run: bool(run.prompt_tokens)):
        base, fast = pair
        lines.append(
            f"LLM prompt tokens per request: mlp2x_gelu {base.prompt_tokens} ({base.image_tokens} image), mbtf_stf "
            f"{fast.prompt_tokens} ({fast.image_tokens} image): {base.prompt_tokens / fast.prompt_tokens:.2f}x, the "
            "most fewer image tokens can save where the LLM's prefill is the whole cost"
        )
    return lines


def _pair(runs: Sequence[Run], keep: Callable[[Run], bool] = lambda run: True) -> tuple[Run, Run] | None:
    """The ``mlp2x_gelu`` and the ``mbtf_stf`` run among those ``keep`` accepts (None unless both are there)."""
    by_projector = {run.projector: run for run in runs if keep(run)}
    if "mlp2x_gelu" in by_projector and "mbtf_stf" in by_projector:
        return by_projector["mlp2x_gelu"], by_projector["mbtf_stf"]
    return None


__all__ = ["PROJECTOR_TARGET", "SCALING_TARGET", "ceilings", "engine_ratios", "targets"]
