"""``python -m llava_stf.bench.compare``: token reducers side by side on the same checkpoints: accuracy, FLOPs,
measured prefill latency and KV-cache memory, one row per (checkpoint, reducer, token budget).

    python -m llava_stf.bench.compare --model-path CKPT [CKPT ...] --benchmark gqa [--data-root playground/data/eval] \\
        --reducers none fastv visionzip ... --tokens 64 128 192 --out DIR [--limit N] [--published]
    python -m llava_stf.bench.compare --model-path A B --benchmark vqa --questions Q.jsonl --image-folder IMGS \\
        --ground-truth GT.jsonl ...

Each checkpoint is loaded once; every reducer and budget runs on it with the same weights (``reducer_variant``).
``none`` and adaptive reducers (PruMerge) run once at their own count, every other reducer at each ``--tokens``
budget (its own ``budget_kwargs`` rule). A combination that cannot run (a vision-side reducer on a grid-merging
projector, a budget above the checkpoint's image tokens) is skipped, counted and listed with its reason.

- **accuracy**: the benchmark through the evaluation engine of ``python -m llava_stf.eval`` with ``--reducer`` /
  ``--tokens`` (the same planning, answering, provenance and scoring; answers and results are filed under the model
  id ``<checkpoint>-<digest>+<reducer>@<budget>``), so a rerun reuses every finished row and ``none`` reuses a plain
  evaluation of the checkpoint. ``--limit N``: the first N questions. MME is reported as perception + cognition.
- **FLOPs** (``llava_stf.flops``): paper convention (LLM over the image tokens) and the whole prefill of one image
  with the questions' mean text tokens (``bench.compare_measure``).
- **latency and KV cache**: measured on a fixed sample of the benchmark's own questions, round-robin over rows
  (``bench.compare_measure``).
- ``--published``: each method's published LLaVA-1.5-7B score at the same budget (``bench.published``).
- AnyRes (LLaVA-NeXT) checkpoints: ``--tokens`` budgets are per crop (``reducer_choice``); each image has its own
  count, so a row's image tokens are the latency sample's measured mean.

Writes ``compare.csv``, ``compare.md``, ``compare.png`` and ``compare.json`` into ``--out``
(``bench.compare_report``). Ordinary mistakes (a missing checkpoint, an unknown reducer or benchmark, a bad budget)
are one ``error:`` line before anything loads.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from ..errors import EXPECTED, UserError, add_debug_flag, run_main
from ..eval.__main__ import LazyGenerator, evaluate, model_identity, options_of
from ..eval.__main__ import parse_args as eval_args
from ..eval.benchmarks import get_benchmark
from ..generation import Generator, default_device, load_checkpoint
from ..loading import DTYPES, check_checkpoint
from ..model import LlavaStfConfig
from ..model.reducers import REDUCERS, ReducerConfigError, get_reducer_class
from ..reducer_choice import NONE, ReducerChoice, ResolvedReducer, reducer_variant
from .compare_measure import Prefill, flops, latency_sample, layer_average_tokens, measure_prefill, text_tokens
from .compare_report import Row, Skip, label, write_all
from .published import comparable_score, published_score

logger = logging.getLogger("llava_stf.bench.compare")
EVAL_FLAGS = ("data_root", "results_dir", "split", "questions", "image_folder", "ground_truth", "max_new_tokens")


@dataclass(frozen=True)
class Planned:
    """A row to run: a checkpoint under a reducer choice that resolves on it."""

    checkpoint: Path
    reducer: str  # registry name or "none"
    budget: int | None
    choice: ReducerChoice
    resolved: ResolvedReducer


def checkpoint_names(paths: list[Path]) -> dict[Path, str]:
    """Short names for the table: the folder name, with its parent's where two folders share a name
    (``mbtf_stf-seed0/stage2``), else the full path."""
    names = {}
    for depth in (1, 2, None):
        names = {p: str(p) if depth is None else "/".join(p.resolve().parts[-depth:]) for p in paths}
        if len(set(names.values())) == len(names):
            break
    return names


def plan(checkpoints: list[Path], reducers: list[str], budgets: list[int]) -> tuple[list[Planned], list[Skip]]:
    """Every (checkpoint, reducer, budget) that resolves, and the ones that cannot run with their reasons."""
    rows, skips, names = [], [], checkpoint_names(checkpoints)
    for path in checkpoints:
        config = AutoConfig.from_pretrained(path)  # the checkpoint's own class: 1.5 or AnyRes (NeXT)
        if not isinstance(config, LlavaStfConfig):
            raise UserError(f"{path} is not a llava_stf checkpoint (config model_type {config.model_type!r})")
        for name in reducers:
            fixed = name == NONE or get_reducer_class(name).adaptive
            for budget in [None] if fixed else budgets:
                choice = ReducerChoice(None if name == NONE else name, None, budget)
                try:
                    rows.append(Planned(path, name, budget, choice, choice.resolve(config)))
                except ReducerConfigError as err:
                    skips.append(Skip(names[path], name, budget, str(err)))
                    logger.warning("skipped %s %s: %s", names[path], label(name, budget), err)
    return rows, skips


def _eval_argv(args: argparse.Namespace, path: Path, planned: Planned | None = None) -> list[str]:
    """The ``python -m llava_stf.eval`` flags of one row (``planned=None``: the checkpoint as saved)."""
    argv = ["--benchmark", args.benchmark, "--model-path", str(path), "--batch-size", str(args.batch_size)]
    argv += ["--num-chunks", "1", "--chunk-idx", "0"]
    for name in EVAL_FLAGS:
        if getattr(args, name) is not None:
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    argv += ["--all-rounds"] * args.all_rounds + ["--no-progress"] * args.no_progress
    argv += ["--limit", str(args.limit)] if args.limit else []
    argv += ["--device", str(args.device)] + (["--dtype", args.dtype] if args.dtype else [])
    if planned is not None:
        argv += ["--reducer", planned.reducer] + (["--tokens", str(planned.budget)] if planned.budget else [])
    return argv


def _load(path: Path, device: torch.device, dtype: torch.dtype | None) -> Generator:
    try:
        return Generator(*load_checkpoint(path, device, dtype))
    except EXPECTED:
        raise
    except Exception as err:  # safetensors, torch and transformers each raise their own types
        raise UserError(f"cannot load the checkpoint {path}: {type(err).__name__}: {err}") from err


def check_inputs(args: argparse.Namespace) -> None:
    """One-line errors for an unknown benchmark or reducer, a bad budget, an ``--out`` that is a file and a folder
    that is not a checkpoint, before anything loads."""
    get_benchmark(args.benchmark)
    for name in args.reducers:
        if name != NONE:
            get_reducer_class(name)  # an unknown name lists the valid ones
    if any(isinstance(t, bool) or t < 1 for t in args.tokens):
        raise UserError(f"--tokens must be positive numbers of image tokens, got {args.tokens}")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file, not a folder")
    for path in args.model_path:
        check_checkpoint(path)


def score_row(args: argparse.Namespace, p: Planned, generator: Generator, name: str, texts: float, n: int) -> Row:
    """The row of ``p`` with its score from the evaluation engine (``generator``: the row's shared-weight model)."""
    row_args = eval_args(_eval_argv(args, p.checkpoint, p))
    load = LazyGenerator(p.checkpoint, torch.device(args.device), DTYPES.get(args.dtype), p.choice)
    load.generator = generator  # what load_checkpoint(..., reducer=p.choice) builds, without a second copy
    [(bench, result)] = evaluate(row_args, load=load)
    score, metric = comparable_score(bench.name, result.metrics, result.headline, result.headline_metric)
    tokens = p.resolved.config.num_image_tokens if p.reducer == NONE else p.budget
    published = published_score(p.reducer, tokens, bench.name) if args.published else None
    notes = [] if score is not None else list(result.notes) or ["no local score"]
    return Row(name, model_identity(row_args).model_id, p.reducer, p.budget, p.resolved.kwargs, 0.0, 0.0, texts, n,
               score, metric, published, 0.0, 0.0, None, None, None, notes)  # fmt: skip


def add_costs(row: Row, p: Planned, measured: Prefill | None) -> None:
    """FLOPs (with the measured count of an adaptive reducer) and the measured prefill and KV cache of ``row``."""
    counts, sizes = (measured.counts, measured.sizes) if measured is not None else (None, None)
    f = flops(p.resolved.config, row.text_tokens, counts, sizes)
    row.image_tokens, row.equivalent_tokens = f.image_tokens, f.equivalent_tokens
    row.paper_tflops, row.prefill_tflops = f.paper / 1e12, f.prefill / 1e12
    if measured is not None:
        row.prefill_ms, row.llm_ms, row.kv_mb = measured.prefill_ms, measured.llm_ms, measured.kv_bytes / 2**20
    if p.resolved.config.anyres:  # each image its own count: the latency sample's, measured
        if measured is not None:
            row.image_tokens = measured.image_tokens
            row.equivalent_tokens = layer_average_tokens(p.resolved.config, measured.counts)
        else:
            row.notes.append("AnyRes: no latency sample, so FLOPs and image tokens are for a 672x672 image")
    if p.budget is not None and f.equivalent_tokens >= p.resolved.config.reducer_shapes().projector_tokens:
        layers = p.resolved.config.reducer_shapes().num_text_layers
        row.notes.append(
            f"removes no image token on this checkpoint: its schedule keeps them all in each of the LLM's {layers} "
            f"layers ({p.resolved.describe()})"
        )


def header(args: argparse.Namespace, argv: list[str], metric: str, questions: int, timed: int) -> list[str]:
    """The Markdown table's title, the command line and how each number was made."""
    device = torch.device(args.device)
    dtype = DTYPES.get(args.dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    total = f"the first {questions}" if args.limit else str(questions)
    lines = [
        f"# Token reducers on {args.benchmark} ({metric})",
        "",
        f"`python -m llava_stf.bench.compare {shlex.join(argv)}`",
        "",
        f"Score on {total} questions; {device} {str(dtype).removeprefix('torch.')}, threads "
        f"{torch.get_num_threads()}. Latency: median over {timed} of the questions x {args.repeats} rounds (batch 1, "
        "after a warm-up round, round-robin over the rows); KV cache: one image and its prompt, all layers. FLOPs: "
        "one image + the mean text tokens.",
    ]
    if args.published:
        lines.append("Published: LLaVA-1.5-7B as printed (sources in llava_stf/bench/published.py); MME = perception "
                     "+ cognition; FastV's published numbers are disputed.")  # fmt: skip
    return lines


def run(args: argparse.Namespace, argv: list[str]) -> int:
    check_inputs(args)
    first = eval_args(_eval_argv(args, args.model_path[0]))  # the eval's own checks of the benchmark flags
    samples = get_benchmark(args.benchmark).samples(first.data_root, options_of(first))[: args.limit]
    planned, skips = plan(args.model_path, list(dict.fromkeys(args.reducers)), list(dict.fromkeys(args.tokens)))
    names, device, dtype = checkpoint_names(args.model_path), torch.device(args.device), DTYPES.get(args.dtype)
    bases = {path: _load(path, device, dtype) for path in dict.fromkeys(p.checkpoint for p in planned)}
    texts = {path: text_tokens(gen, samples) for path, gen in bases.items()}
    rows, generators = [], []
    for i, p in enumerate(planned, 1):
        base = bases[p.checkpoint]
        generators.append(Generator(*reducer_variant(base.model, base.processor, p.resolved.config)))
        row = score_row(args, p, generators[-1], names[p.checkpoint], texts[p.checkpoint], len(samples))
        rows.append(row)
        score = "—" if row.accuracy is None else f"{row.accuracy:.2f}"
        print(f"[{i}/{len(planned)}] {row.model_id}: {row.metric} {score}", flush=True)
    timed = latency_sample(samples, args.latency_samples)
    for row, p, measured in zip(rows, planned, measure_prefill(generators, timed, args.repeats)):
        add_costs(row, p, measured)
    lines = header(args, argv, rows[0].metric if rows else "score", len(samples), len(timed))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings["model_path"] = [str(p) for p in args.model_path]
    for path in write_all(args.out, rows, skips, lines, settings, args.published):
        print(f"wrote {path}")
    print(f"{len(rows)} rows, {len(skips)} skipped")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llava_stf.bench.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", nargs="+", type=Path, required=True, help="checkpoint folder(s)")
    parser.add_argument("--benchmark", required=True, help="one benchmark of python -m llava_stf.eval")
    parser.add_argument("--reducers", nargs="+", default=[NONE, *REDUCERS], help=f"'{NONE}' and/or REDUCERS names")
    parser.add_argument("--tokens", nargs="+", type=int, default=[64, 128, 192], help="budgets (image tokens)")
    parser.add_argument("--out", type=Path, default=Path("playground/compare"), help="folder for the outputs")
    parser.add_argument("--limit", type=int, help="evaluate the first N questions only")
    parser.add_argument("--published", action="store_true", help="add the published LLaVA-1.5-7B scores")
    parser.add_argument("--latency-samples", type=int, default=8, help="questions timed per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--data-root", type=Path, help="LLaVA eval layout (default: the eval's)")
    parser.add_argument("--results-dir", type=Path, help="default: <data-root>/results (shared with the eval)")
    parser.add_argument("--split", help="question-file stem instead of the benchmark's default")
    parser.add_argument("--questions", type=Path, help="--benchmark vqa: a LLaVA question JSONL")
    parser.add_argument("--image-folder", type=Path, help="--benchmark vqa: its images")
    parser.add_argument("--ground-truth", type=Path, help="--benchmark vqa: its answers")
    parser.add_argument("--all-rounds", action="store_true", help="MMBench: every rotation")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--device", default=str(default_device()))
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 on GPU, float32 on CPU")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--no-progress", action="store_true")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    args.model_path = list(dict.fromkeys(args.model_path))
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.latency_samples < 0 or args.repeats < 1:
        parser.error("--latency-samples must be >= 0 and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("llava_stf").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_main(lambda: run(args, argv), debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["Planned", "checkpoint_names", "main", "parse_args", "plan", "run"]
