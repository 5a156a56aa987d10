"""``python -m llava_stf.demo compare``: the projectors on the generated world, same budget and seeds.

Each (projector, seed) runs the demo pipeline (``pipeline.run_pipeline``) with identical settings except
``projector_type`` and ``seed``: the same generated world (data seed 0), the same pre-trained vision tower, the same
tiny LLM pre-trained on the world's text (seed 0's for every seed, ``DemoSettings.llm_seed``, as LLaVA starts every
run from the same Vicuna; presets without it pre-train one per seed), the same epochs / batch / learning rates for
both stages. Runs are cached like the demo's (the demo's own run of the same preset is reused, e.g.
``mbtf_stf-seed0-detail`` of ``python -m llava_stf.demo --detail``). Writes into ``--results``
(default ``<out>/compare``): ``results.csv`` (one row per run), ``results.md`` (mean and spread over seeds per
projector and question family, and the same for each run's blank-image control) and ``results.png`` (accuracy
against visual tokens and against prefill FLOPs, one panel per family; matplotlib, Agg backend). The world is not
tuned for any projector. It measures the caption-LLM recipe on a world with a fine-detail family (``--detail``,
``pipeline.DETAIL``: a tiny dot per scene, smaller than a tower patch, and 200 held-out scenes; ``pipeline.CAPTIONS``
says why not the cell-word LLM) unless ``--cells``, ``--captions``, ``--fast`` or ``--long`` picks another of the
demo's presets (``pipeline.PRESETS``) for every run.

Trained against training-free compression: each seed's ``mlp2x_gelu`` checkpoint is also evaluated with the
reducers of ``--reducers`` (default ``REDUCERS``) at ``--reducer-tokens`` image tokens (default: a quarter of its
count, the budget of the 4x projectors), as rows ``mlp2x_gelu+<reducer>@<N>`` next to the trained projectors.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

from ..data.synthetic import ALL_FAMILIES, DETAIL, DOT_RADIUS, FAMILIES
from ..errors import UserError
from .paired import paired_difference
from .pipeline import PRESETS, DemoSettings, RunReport, add_preset_flags, evaluate_reduced, preset_suffix, run_pipeline
from .token_probe import ATTRIBUTES, probe_tokens
from .world import digest

# The paper's six (its Table 5 ablations and the LLaVA-1.5 baseline) and TokenPacker, a trained 4x peer.
PROJECTORS = ("mlp2x_gelu", "avgpool", "token_concat", "stf", "mbtf", "mbtf_stf", "tokenpacker")
# Training-free reducers run on the trained mlp2x_gelu checkpoints at the compressed projectors' budget: pooling and
# random selection (the floors), and three 2025 selectors from the reducer lab (vision-side: any LLM depth works).
REDUCERS = ("pool", "random", "visionzip", "divprune", "vispruner")
BASE = "mlp2x_gelu"  # the uncompressed projector whose checkpoints the reducers reduce
METRICS = ("accuracy", *(f"accuracy_{f}" for f in ALL_FAMILIES))
BLANK = tuple(f"blank_{k}" for k in METRICS)  # the same checkpoints on the blank-image control
PROBES = tuple(f"probe_{a}" for a in ATTRIBUTES)  # what the image tokens carry (``token_probe``), trained rows only


def row(report: RunReport, projector: str, seed: int, probes: dict[str, float] | None = None) -> dict[str, Any]:
    m, b, p = report.metrics, report.blank_metrics, probes or {}
    return {"projector": projector, "seed": seed, "visual_tokens": report.image_tokens, "prefill_flops": report.flops,
            "llm_visual_flops": report.llm_visual_flops,
            **{k: round(m[k], 2) if k in m else "" for k in METRICS}, "questions": m["questions"],
            **{f"blank_{k}": round(b[k], 2) if k in b else "" for k in METRICS},
            **{k: round(p[k], 2) if k in p else "" for k in PROBES}}  # fmt: skip


def probes(report: RunReport) -> dict[str, float]:
    """``token_probe.probe_tokens`` of a run's checkpoint, kept next to it (``token_probe.json``) for the same
    checkpoint (the digest of its stage marker) and world; {} for a world of one's own (no scene descriptions)."""
    if report.world.staged is not None:
        return {}
    key = {"stage": digest(report.checkpoint / "demo_stage.json"), "world": report.world.keys["train"]}
    path = report.checkpoint.parent / "token_probe.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("key") == key:
        return saved["probes"]
    found = probe_tokens(report.checkpoint, report.world.root)
    path.write_text(json.dumps({"key": key, "probes": found}, indent=1))
    return found


def reducer_budget(report: RunReport, reducer_tokens: int | None) -> int:
    """The reducers' image-token budget on ``report``'s checkpoint: ``reducer_tokens``, else a quarter of its count."""
    return reducer_tokens or max(1, report.image_tokens // 4)


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per projector (first-seen order): tokens, FLOPs, and per metric (mean, sample std, min, max) over seeds."""
    out = []
    for projector in dict.fromkeys(r["projector"] for r in rows):
        mine = [r for r in rows if r["projector"] == projector]
        stats = {}
        for k in (*METRICS, *BLANK, *PROBES):
            values = [float(r[k]) for r in mine if r.get(k, "") != ""]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                stats[k] = (statistics.fmean(values), std, min(values), max(values))
        out.append({"projector": projector, "visual_tokens": mine[0]["visual_tokens"],
                    "prefill_flops": mine[0]["prefill_flops"], "llm_visual_flops": mine[0]["llm_visual_flops"],
                    "seeds": len(mine), "stats": stats})  # fmt: skip
    return out


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def families(groups: list[dict[str, Any]]) -> tuple[str, ...]:
    """The world's question families: ``FAMILIES``, and ``DETAIL`` where some run has answers for it."""
    return (*FAMILIES, *([DETAIL] if any(f"accuracy_{DETAIL}" in g["stats"] for g in groups) else []))


def _table(groups: list[dict[str, Any]], keys: tuple[str, ...]) -> list[str]:
    names = ["all", *families(groups)]
    keys = keys[: len(names)]  # METRICS / BLANK order: "all", then ALL_FAMILIES (DETAIL last)
    lines = ["| projector | visual tokens | prefill MFLOPs | LLM MFLOPs on visual tokens | " + " | ".join(names) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(names)]  # fmt: skip
    for g in groups:
        cells = [f"{g['stats'][k][0]:.1f} ± {g['stats'][k][1]:.1f}" if k in g["stats"] else "—" for k in keys]
        lines.append(f"| {g['projector']} | {g['visual_tokens']} | {g['prefill_flops'] / 1e6:.1f} | "
                     f"{g['llm_visual_flops'] / 1e6:.2f} | " + " | ".join(cells) + " |")  # fmt: skip
    return lines


def paired_lines(rows: list[dict[str, Any]], base: str = BASE) -> list[str]:
    """Overall accuracy of each other row group minus ``base``'s, paired by seed, with a 95 % t interval."""

    def by_seed(name: str) -> dict[int, float]:
        return {int(r["seed"]): float(r["accuracy"]) for r in rows if r["projector"] == name and r["accuracy"] != ""}

    reference = by_seed(base)
    lines = []
    for name in dict.fromkeys(r["projector"] for r in rows):
        d = None if name == base else paired_difference(by_seed(name), reference)
        if d is not None:
            ci = "— (one seed)" if d.low is None else f"{d.low:+.1f} to {d.high:+.1f}"
            lines.append(f"| {name} | {d.mean:+.1f} | {ci} | {d.seeds} |")
    if not lines:
        return []
    return ["", f"Paired difference of overall accuracy against {base} (points; per seed, each projector minus {base} "
            "of the same seed, then the mean over seeds and its 95 % Student-t interval with n − 1 degrees of "
            "freedom; an interval that contains 0 does not tell the two apart):", "",
            f"| projector | Δ vs {base} | 95 % CI | seeds |", "|---|---:|---:|---:|", *lines]  # fmt: skip


def write_markdown(path: Path, groups: list[dict[str, Any]], note: str,
                   rows: list[dict[str, Any]] | None = None) -> None:  # fmt: skip
    """The accuracy table, the paired differences against ``BASE`` (from ``rows``, the per-run rows), the
    blank-image control table of the same checkpoints, and how to read them."""
    spread = max((g["stats"]["accuracy"][3] - g["stats"]["accuracy"][2] for g in groups), default=0.0)
    worst = max(groups, key=lambda g: g["stats"]["accuracy"][1])
    questions = sorted({int(r["questions"]) for r in rows or []})
    lines = [*_table(groups, METRICS), "",
             f"Exact-match accuracy (%) on the held-out questions"
             f"{' (' + '/'.join(map(str, questions)) + ' per run)' if questions else ''}, mean ± sample std over "
             f"{groups[0]['seeds']} seed(s) per projector; the largest sample std of overall accuracy across seeds "
             f"is {worst['stats']['accuracy'][1]:.1f} points ({worst['projector']}), the largest min-max spread "
             f"{spread:.1f} points.", *paired_lines(rows or []), "",
             "Blank-image control: the same checkpoints, every question asked about a blank canvas (what each model "
             "answers from the question alone; the gap to the table above is what it reads from the image):", "",
             *_table(groups, BLANK), *probe_lines(groups), "", note]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def probe_lines(groups: list[dict[str, Any]]) -> list[str]:
    """The table of what each trained projector's image tokens carry (``token_probe``); none without probes."""
    names = [a for a in ATTRIBUTES if any(f"probe_{a}" in g["stats"] for g in groups)]
    measured = [g for g in groups if any(f"probe_{a}" in g["stats"] for a in names)]
    if not measured:
        return []
    head = {"dot": "tiny dot's colour", "color": "object colour", "shape": "object shape"}
    lines = ["", "What the image tokens carry: held-out accuracy (%) of a linear probe on each trained checkpoint's "
             "image tokens (tower + projector, what its LLM reads), at the token covering the tiny dot's centre or an "
             "object's centre (`llava_stf/demo/token_probe.py`; mean ± sample std over seeds; chance: colour 16.7, "
             "shape 25):", "", "| projector | visual tokens | " + " | ".join(head[a] for a in names) + " |",
             "|---|---:|" + "---:|" * len(names)]  # fmt: skip
    for g in measured:
        cells = [f"{g['stats'][k][0]:.1f} ± {g['stats'][k][1]:.1f}" if (k := f"probe_{a}") in g["stats"] else "—"
                 for a in names]  # fmt: skip
        lines.append(f"| {g['projector']} | {g['visual_tokens']} | " + " | ".join(cells) + " |")
    return lines


def plot(path: Path, groups: list[dict[str, Any]]) -> None:
    """Accuracy vs visual tokens (top row) and vs prefill FLOPs (bottom row), one column per family; filled markers
    with error bars are the runs, hollow markers their blank-image control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = ["all", *families(groups)]
    fig, axes = plt.subplots(2, len(names), figsize=(3 * len(names), 6), squeeze=False)
    for col, (key, title) in enumerate(zip(METRICS, names)):
        for row_i, (xkey, xlabel, scale) in enumerate((("visual_tokens", "visual tokens", 1.0),
                                                       ("prefill_flops", "prefill MFLOPs", 1e-6))):  # fmt: skip
            ax = axes[row_i][col]
            for i, g in enumerate(groups):
                if key not in g["stats"]:
                    continue
                mean, std = g["stats"][key][:2]
                x = g[xkey] * scale * (1 + 0.03 * (i - len(groups) / 2))  # small jitter: several share a count
                ax.errorbar([x], [mean], yerr=[std], fmt="o", capsize=3, label=g["projector"], color=f"C{i}")
                if f"blank_{key}" in g["stats"]:  # hollow marker: the blank-image control of the same runs
                    ax.plot([x], [g["stats"][f"blank_{key}"][0]], marker="o", mfc="none", ls="none", color=f"C{i}")
            ax.set_xscale("log")
            ticks: list[float] = []
            for t in sorted({round(g[xkey] * scale, 1) for g in groups}):  # drop labels that would overlap
                ticks += [t] if not ticks or t > 1.05 * ticks[-1] else []
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the measured values are labelled
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks], rotation=45, fontsize=7)
            ax.set_xlabel(xlabel)
            ax.set_title(title)
            ax.set_ylim(-5, 105)
            if col == 0:
                ax.set_ylabel("accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("accuracy (%), mean ± std over seeds; hollow markers: the same models with a blank image", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def compare(out: Path, results: Path, settings: DemoSettings, projectors: list[str], seeds: list[int],
            progress: bool = True, suffix: str = "", reducers: tuple[str, ...] = (),
            reducer_tokens: int | None = None, jobs: int = 1) -> list[dict[str, Any]]:  # fmt: skip
    """Run (or reuse) every (projector, seed) as ``<projector>-seed<seed><suffix>``; write results.* to ``results``.

    ``reducers``: training-free reducers evaluated on each seed's ``mlp2x_gelu`` checkpoint (it must be among
    ``projectors``) at ``reducer_tokens`` image tokens (default: a quarter of its count, the paper's 4x), as rows
    ``mlp2x_gelu+<reducer>@<tokens>``: trained and training-free compression on the same world, side by side.
    ``jobs`` > 1: that many runs at a time in worker processes (``fill_side_by_side``); the results are the same.
    """
    from ..model.reducers import REDUCERS as REGISTRY

    unknown = [r for r in reducers if r not in REGISTRY]
    if unknown:  # before any training, not after it
        raise UserError(f"unknown --reducers {', '.join(unknown)}; valid reducers: {', '.join(sorted(REGISTRY))}")
    if reducers and BASE not in projectors:
        raise UserError(f"--reducers reduce the {BASE} checkpoints: add {BASE} to --projectors or pass --reducers")
    rows, start, bases = [], time.perf_counter(), []
    if jobs > 1:  # fill the run caches side by side; the loop below then reads every run back in order
        fill_side_by_side(out, settings, projectors, seeds, suffix, reducers, reducer_tokens, jobs)
    for projector in projectors:
        for seed in seeds:
            s = dataclasses.replace(settings, projector_type=projector, seed=seed)
            print(f"== {projector} seed {seed} ({time.perf_counter() - start:.0f} s so far)", flush=True)
            report = run_pipeline(out, s, f"{projector}-seed{seed}{suffix}", progress)
            rows.append(row(report, projector, seed, probes(report)))
            bases += [(report, s)] if projector == BASE else []
    for report, s in bases:
        tokens = reducer_budget(report, reducer_tokens)
        for reducer in reducers:
            print(f"== {BASE} seed {s.seed} + {reducer} at {tokens} tokens, no training", flush=True)
            reduced = evaluate_reduced(report, out, s, reducer, tokens, progress)
            rows.append(row(reduced, f"{BASE}+{reducer}@{tokens}", s.seed))
    results.mkdir(parents=True, exist_ok=True)
    groups = aggregate(rows)
    world = (f"{settings.image_size}-px scenes ({settings.num_train} for training, {settings.num_eval} held out"
             + (f", each with a tiny dot {2 * DOT_RADIUS:.0%} of the image side across, smaller than a tower patch, "
                "asked about by the `detail` family" if settings.detail else "") + ")")  # fmt: skip
    llm = "" if settings.llm_seed is None else f" One LLM, seed {settings.llm_seed}'s, for every training seed."
    note = (f"World: {world}.{llm} Budget per run: stage 1 {settings.stage1_epochs} epoch(s), stage 2 "
            f"{settings.stage2_epochs} epoch(s), batch {settings.batch_size}; {len(rows)} runs took "
            f"{time.perf_counter() - start:.0f} s in this invocation (cached runs count ~0).")  # fmt: skip
    if bases and reducers:
        note += (f" Rows `{BASE}+<reducer>@<N>`: the trained {BASE} checkpoints of the same seeds with a training-free "
                 "token reducer keeping N image tokens (`python -m llava_stf.eval --reducer NAME --tokens N`), "
                 "nothing retrained.")  # fmt: skip
    write_csv(results / "results.csv", rows)
    write_markdown(results / "results.md", groups, note, rows)
    plot(results / "results.png", groups)
    print((results / "results.md").read_text(), flush=True)
    return rows


def _worker_setup(threads: int) -> None:
    """A worker process: ``threads`` torch threads, the demo's allocator setting, its quiet logging."""
    import torch
    from transformers.utils import logging as hf_logging

    from .malloc import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fill_one(task: tuple[Path, DemoSettings, str, tuple[str, ...], int | None]) -> str:
    """One (projector, seed) run in a worker: trained and evaluated (or found cached), its token probes, and the
    reducer evaluations of a ``BASE`` run, all into the caches ``compare`` reads back."""
    out, s, suffix, reducers, reducer_tokens = task
    name = f"{s.projector_type}-seed{s.seed}{suffix}"
    clock = time.perf_counter()
    report = run_pipeline(out, s, name, progress=False)
    probes(report)
    if s.projector_type == BASE:
        for reducer in reducers:
            evaluate_reduced(report, out, s, reducer, reducer_budget(report, reducer_tokens))
    return f"{name}: {report.metrics['accuracy']:.1f} % ({time.perf_counter() - clock:.0f} s)"


def fill_side_by_side(out: Path, settings: DemoSettings, projectors: list[str], seeds: list[int], suffix: str,
                      reducers: tuple[str, ...], reducer_tokens: int | None, jobs: int) -> None:  # fmt: skip
    """Every (projector, seed) run, ``jobs`` at a time in spawned processes with ``os.cpu_count() // jobs`` torch
    threads each (on 2 cores two one-thread runs finish ~1.3x sooner than one after the other with two threads, with
    the same losses and answers). The world, the tower and each seed's LLM are built first, here, so that no two
    workers build the same thing."""
    import multiprocessing

    from .pipeline import prepare_shared

    for seed in seeds:
        prepare_shared(out, dataclasses.replace(settings, seed=seed))
    tasks = [(out, dataclasses.replace(settings, projector_type=p, seed=seed), suffix, reducers, reducer_tokens)
             for p in projectors for seed in seeds]  # fmt: skip
    threads = max(1, (os.cpu_count() or 1) // jobs)
    print(f"== {len(tasks)} runs, {jobs} at a time ({threads} thread(s) each)", flush=True)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch thread pool or locks inherited
    with context.Pool(jobs, initializer=_worker_setup, initargs=(threads,)) as pool:
        for done in pool.imap_unordered(_fill_one, tasks):
            print(f"== done {done}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_stf.demo compare", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("playground/demo"), help="artifact folder (shared with demo)")
    parser.add_argument("--results", type=Path, help="where results.* go (default: <out>/compare)")
    parser.add_argument("--projectors", nargs="+", default=list(PROJECTORS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    parser.add_argument("--reducers", nargs="*", default=list(REDUCERS),
                        help=f"training-free reducers on the {BASE} checkpoints (default: {' '.join(REDUCERS)}; "
                        "none: pass the flag alone)")  # fmt: skip
    parser.add_argument("--reducer-tokens", type=int, help=f"their image-token budget (default: a quarter of {BASE}'s)")
    add_preset_flags(parser, default="detail")  # see pipeline.CAPTIONS: why not the cell-word LLM
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, each in its own process with "
                        "cpu_count / jobs threads (default 2: on 2 cores ~1.3x sooner, the same results; 1: one "
                        "after the other in this process)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    if BASE not in args.projectors and "--reducers" not in argv:
        args.reducers = []  # the default reducers need the mlp2x_gelu runs; asked for explicitly, that is an error
    if args.reducer_tokens is not None and args.reducer_tokens < 1:
        raise UserError(f"--reducer-tokens must be at least 1, got {args.reducer_tokens}")
    os.environ.setdefault("WANDB_MODE", "disabled")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    settings = PRESETS[args.preset]
    results = args.results or args.out / "compare"
    compare(
        args.out,
        results,
        settings,
        args.projectors,
        args.seeds,
        not args.no_progress,
        preset_suffix(args.preset),
        tuple(args.reducers),
        args.reducer_tokens,
        args.jobs,
    )
    return 0


__all__ = [
    "BASE",
    "PROJECTORS",
    "REDUCERS",
    "aggregate",
    "compare",
    "fill_side_by_side",
    "families",
    "main",
    "paired_lines",
    "probe_lines",
    "probes",
    "reducer_budget",
    "plot",
    "write_csv",
    "write_markdown",
]
