"""``python -m llava_stf.eval``: answer, merge and score LLaVA-1.5's nine benchmarks; print results tables.

Run ``python -m llava_stf.eval --benchmark gqa pope --model-path CKPT [--batch-size 8]`` over an existing LLaVA
``playground/data/eval``. Sharding: ``--num-chunks N --chunk-idx I`` (or ``CHUNKS``/``IDX``, or torchrun's
``WORLD_SIZE``/``RANK``; each process then works on its own GPU). Interrupted runs resume where they stopped; the
process that answers the last question merges and scores, and a rerun with everything answered only merges and
scores (no model is loaded). ``--table --model-path A B [--paper]`` prints the combined table;
``--record vqav2=78.5 --model-path A`` records a number returned by an evaluation server.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from ..generation import GenerationSettings, Generator, default_device, load_checkpoint
from .benchmarks import BENCHMARKS, PAPER_BENCHMARKS, Benchmark, Options, Result, get_benchmark
from .engine import Sample, Shard, check_images, count_answered, finalize, remove_answers, run_shard
from .results import PAPER_ROWS, format_table, load_results, results_file, table_row, update_results

logger = logging.getLogger("llava_stf.eval")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def model_id_from_path(path: str | Path) -> str:
    """Upstream's name for a checkpoint: its folder name (``<parent>_checkpoint-N`` for Trainer checkpoints)."""
    path = Path(path).resolve()
    return f"{path.parent.name}_{path.name}" if path.name.startswith("checkpoint-") else path.name


class LazyGenerator:
    """Loads the checkpoint on first use only, so runs with nothing left to answer never load a model."""

    def __init__(self, model_path: Path, device: torch.device, dtype: torch.dtype | None):
        self.model_path, self.device, self.dtype = model_path, device, dtype
        self.generator: Generator | None = None

    def __call__(self) -> Generator:
        if self.generator is None:
            logger.info("loading %s on %s", self.model_path, self.device)
            self.generator = Generator(*load_checkpoint(self.model_path, self.device, self.dtype))
        return self.generator


def run_benchmark(
    bench: Benchmark,
    samples: list[Sample],
    load_generator: LazyGenerator,
    args: argparse.Namespace,
    model_id: str,
    shard: Shard,
) -> Result | None:
    """Answer (this shard of) a benchmark, then merge and score once every question is answered."""
    options = Options(split=args.split, all_rounds=args.all_rounds)
    answers_file = bench.answers_file(args.data_root, model_id, options)
    if args.overwrite:
        remove_answers(answers_file)
    records = finalize(samples, answers_file) if answers_file.is_file() else None
    if records is None:
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens or bench.max_new_tokens)
        run_shard(
            samples,
            answers_file,
            load_generator,
            model_id=model_id,
            settings=settings,
            batch_size=args.batch_size,
            shard=shard,
            progress=not args.no_progress,
            label=bench.name,
        )
        records = finalize(samples, answers_file)
    if records is None:
        done = count_answered(samples, answers_file)
        logger.info(
            "%s: %d of %d questions answered; the last chunk to finish merges and scores",
            bench.name,
            done,
            len(samples),
        )
        return None
    result = bench.score(args.data_root, records, model_id, options)
    entry = {
        "column": bench.column,
        "headline": result.headline,
        "headline_metric": result.headline_metric,
        "source": "local" if result.headline is not None else None,
        "split": bench.split(options),
        "answers_file": str(answers_file),
        "metrics": dict(result.metrics),
        "files": list(result.files),
        "notes": list(result.notes),
    }
    update_results(results_file(args.results_dir, model_id), bench.name, entry, model_id=model_id)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llava_stf.eval",
        description="Answer, merge and score LLaVA-1.5's nine benchmarks; print tables.",
    )
    parser.add_argument(
        "--benchmark", nargs="+", default=[], help=f"'all' (the paper's nine) or any of: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--model-path", nargs="+", type=Path, required=True, help="checkpoint folder(s)")
    parser.add_argument("--model-id", help="name in answer files and results (default: the checkpoint folder name)")
    parser.add_argument("--data-root", type=Path, default=Path("playground/data/eval"))
    parser.add_argument("--results-dir", type=Path, help="default: <data-root>/results")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="left-padded batches; answers match batch 1 (exactly in float32 on CPU)",
    )
    parser.add_argument("--num-chunks", type=int, help="number of shards (default: CHUNKS, WORLD_SIZE or 1)")
    parser.add_argument("--chunk-idx", type=int, help="this process's shard (default: IDX, RANK or 0)")
    parser.add_argument("--max-new-tokens", type=int, help="override the benchmark's limit (128 or 1024)")
    parser.add_argument("--split", help="question-file stem instead of the benchmark's default")
    parser.add_argument("--all-rounds", action="store_true", help="MMBench: ask every rotation (CircularEval)")
    parser.add_argument("--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 on GPU, float32 on CPU")
    parser.add_argument("--overwrite", action="store_true", help="delete earlier answers of these benchmarks first")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the combined table of --model-path(s)")
    parser.add_argument("--paper", action="store_true", help="with --table: add the published 7B rows")
    parser.add_argument("--record", nargs="+", default=[], metavar="NAME=SCORE", help="record server scores")
    args = parser.parse_args(argv)
    args.results_dir = args.results_dir or args.data_root / "results"
    if not (args.benchmark or args.table or args.record):
        parser.error("give --benchmark, --table or --record")
    if len(args.model_path) > 1 and (args.benchmark or args.record):
        parser.error("--benchmark and --record take one --model-path (several only with --table)")
    return args


def _device(args: argparse.Namespace) -> torch.device:
    if args.device:
        return torch.device(args.device)
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return default_device()


def _record(args: argparse.Namespace, model_id: str) -> None:
    for item in args.record:
        name, _, score = item.partition("=")
        bench = get_benchmark(name)
        entry = {"column": bench.column, "headline": float(score), "headline_metric": "server", "source": "server"}
        update_results(results_file(args.results_dir, model_id), name, entry, model_id=model_id)
        print(f"recorded {bench.column} = {float(score):.1f} for {model_id}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("llava_stf").setLevel(logging.INFO)
    model_ids = [args.model_id or model_id_from_path(p) for p in args.model_path]
    scored = False
    if args.record:
        _record(args, model_ids[0])
    if args.benchmark:
        names = list(PAPER_BENCHMARKS) if args.benchmark == ["all"] else args.benchmark
        benches = [get_benchmark(name) for name in names]
        shard = Shard.from_env(args.num_chunks, args.chunk_idx)
        if args.overwrite and shard.count > 1:
            raise SystemExit("--overwrite deletes every chunk's answers; run it once without chunks first")
        options = Options(split=args.split, all_rounds=args.all_rounds)
        questions = [bench.samples(args.data_root, options) for bench in benches]
        for bench, samples in zip(benches, questions):  # pre-flight over every benchmark before any model loads
            check_images(samples, None if args.overwrite else bench.answers_file(args.data_root, model_ids[0], options))
        load = LazyGenerator(args.model_path[0], _device(args), DTYPES.get(args.dtype))
        for bench, samples in zip(benches, questions):
            result = run_benchmark(bench, samples, load, args, model_ids[0], shard)
            scored |= result is not None
            for line in [] if result is None else [*result.notes, *(f"wrote {f}" for f in result.files)]:
                print(f"{bench.name}: {line}")
    if args.table or scored:
        rows = [(m, table_row(load_results(results_file(args.results_dir, m)))) for m in model_ids]
        if args.paper:
            rows = [*PAPER_ROWS.items(), *rows]
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
