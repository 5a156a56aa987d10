"""``python -m llava_stf.eval``: answer, merge and score LLaVA-1.5's nine benchmarks (or a question file of one's own
with ``--benchmark vqa --questions FILE``); print results tables.

Run ``python -m llava_stf.eval --benchmark gqa pope --model-path CKPT [--batch-size 8]`` over an existing LLaVA
``playground/data/eval``. Sharding: ``--num-chunks N --chunk-idx I`` (or ``CHUNKS``/``IDX``, or torchrun's
``WORLD_SIZE``/``RANK``; each process then works on its own GPU). Interrupted runs resume where they stopped; the
process that answers the last question merges and scores, and a rerun with everything answered only merges and
scores (no model is loaded). ``--table --model-path A B [--paper]`` prints the combined table;
``--record vqav2=78.5 --model-path A`` records a number returned by an evaluation server.

Provenance: the model id (answer and results file names) is the checkpoint folder's name plus the first digits of
its content digest (``llava_stf.provenance``), so two checkpoints in folders of the same name never share files.
Saved answers are reused only when their record (checkpoint digest, question-file digest, generation settings)
matches this run; otherwise the run stops before loading anything, naming what differs. ``--overwrite`` starts
over: it deletes earlier answers only after the questions, images and checkpoint are checked and the model has
loaded. ``--adopt-answers`` takes answers without a record (upstream LLaVA's) as this run's. Everything is read and
checked before any model loads; an ordinary failure is one ``error: ...`` line (``--debug``: the traceback).

Token reducers on any checkpoint: ``--reducer NAME [--reducer-kwargs JSON | --tokens N]`` (``--reducer none`` removes
one the checkpoint has; see ``llava_stf.reducer_choice``). ``--tokens N`` takes the reducer's own rule for a budget of
N image tokens, and the mapping is printed. The reducer and its settings join the provenance and the model id
(``stage2-1a2b3c4d+fastv@64``), so answers with another reducer or budget are never reused. ``--limit N`` answers
and scores the first N questions only (model id ``...-first<N>``): a quick look, not the benchmark's score.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.images import ImageLimits
from ..errors import EXPECTED, UserError, add_debug_flag, run_main
from ..generation import GenerationSettings, Generator, default_device, load_checkpoint
from ..loading import DTYPES, check_checkpoint, load_config
from ..provenance import Provenance, file_digest
from ..reducer_choice import ReducerChoice, add_reducer_flags, choice_from_args
from .answers import has_answers, read_provenance, write_provenance
from .benchmarks import BENCHMARKS, PAPER_BENCHMARKS, VQA, Benchmark, Options, Result, get_benchmark
from .engine import (
    Sample,
    Shard,
    StaleAnswersError,
    check_images,
    count_answered,
    finalize,
    provenance_conflict,
    remove_answers,
    run_shard,
)
from .identity import Identity, identity_of
from .identity import default_model_id as default_model_id  # re-exported: callers name these from here
from .identity import model_id_from_path as model_id_from_path
from .results import PAPER_ROWS, format_table, load_results, results_file, table_row, update_results

logger = logging.getLogger("llava_stf.eval")


def model_identity(args: argparse.Namespace) -> Identity:
    """The identity of the first ``--model-path`` with ``--reducer`` and ``--limit`` (``--model-id`` names it)."""
    model_id = args.model_id[0] if args.model_id else None
    return identity_of(args.model_path[0], model_id, choice_from_args(args), args.limit)


class LazyGenerator:
    """Loads the checkpoint on first use only, so runs with nothing left to answer never load a model."""

    def __init__(
        self, model_path: Path, device: torch.device, dtype: torch.dtype | None, reducer: ReducerChoice | None = None
    ):
        self.model_path, self.device, self.dtype, self.reducer = model_path, device, dtype, reducer
        self.generator: Generator | None = None

    @property
    def dtype_name(self) -> str:
        """The weight dtype it loads with (``load_checkpoint``'s default when none was given)."""
        dtype = self.dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        return str(dtype).removeprefix("torch.")

    def __call__(self) -> Generator:
        """The generator, loading the checkpoint the first time.

        Raises:
            UserError: If the checkpoint cannot be loaded (corrupt weights, ...); the cause is chained (``--debug``).
        """
        if self.generator is None:
            logger.info("loading %s on %s", self.model_path, self.device)
            try:
                loaded = load_checkpoint(self.model_path, self.device, self.dtype, reducer=self.reducer)
                self.generator = Generator(*loaded)
            except EXPECTED:
                raise
            except Exception as err:  # safetensors, torch and transformers each raise their own types
                raise UserError(f"cannot load the checkpoint {self.model_path}: {type(err).__name__}: {err}") from err
        return self.generator


@dataclass(frozen=True)
class Job:
    """One benchmark of a run, read and checked before any model loads."""

    bench: Benchmark
    samples: list[Sample]
    answers_file: Path
    settings: GenerationSettings
    provenance: Provenance
    start_over: bool  # earlier answers are deleted (once the model has loaded) and answered again
    adopt: bool  # earlier answers without a provenance record are taken as this run's


def plan(
    args: argparse.Namespace,
    benches: Sequence[Benchmark],
    identity: Identity,
    load: LazyGenerator,
    shard: Shard,
    replace_stale: bool = False,
) -> list[Job]:
    """Read every question file, compare saved answers' provenance and check every image; nothing is written.

    Args:
        identity: The checkpoint, model id and reducer the answers are filed under.
        replace_stale: Start over wherever saved answers do not match (instead of refusing); the demo's choice.

    Raises:
        StaleAnswersError: Listing the benchmarks whose saved answers were made otherwise (unless told to start over).
        QuestionFileError, ImageCheckError, FileNotFoundError: For bad or missing inputs.
    """
    options, jobs, refusals, unrecorded_any = options_of(args), [], [], False
    model_id, reducer = identity.model_id, identity.reducer
    for bench in benches:
        samples = bench.samples(args.data_root, options)[: args.limit]
        question_file = bench.question_file(args.data_root, options)
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens or bench.max_new_tokens)
        generation = {**dataclasses.asdict(settings), "dtype": load.dtype_name}
        provenance = Provenance(
            checkpoint=identity.digest,
            questions=file_digest(question_file),
            generation=generation,
            checkpoint_path=str(Path(load.model_path).resolve()),
            questions_path=str(question_file.resolve()),
            extra={"model_id": model_id, **({"reducer_tokens": reducer.tokens} if reducer else {})},
            reducer=reducer.record() if reducer is not None else None,
        )
        answers_file = bench.answers_file(args.data_root, model_id, options)
        try:
            conflict = provenance_conflict(answers_file, provenance)
            unrecorded = conflict is not None and read_provenance(answers_file) is None
        except ValueError as err:  # an unreadable record: as good as a differing one
            conflict, unrecorded = str(err), False
        start_over = args.overwrite or (conflict is not None and replace_stale)
        adopt = unrecorded and args.adopt_answers and not start_over
        if conflict and not (start_over or adopt):
            refusals.append(f"{bench.name}: {conflict}")
            unrecorded_any |= unrecorded
        jobs.append(Job(bench, samples, answers_file, settings, provenance, start_over, adopt))
    if refusals:
        adopt_hint = ", or --adopt-answers if they are this checkpoint's" if unrecorded_any else ""
        raise StaleAnswersError(
            f"{'; '.join(refusals)}. Pass --overwrite to answer again (the saved answers are deleted only once the "
            f"inputs are checked and the model has loaded), or use another --model-id{adopt_hint}"
        )
    for job in jobs:  # every benchmark's images, before any model loads
        check_images(job.samples, None if job.start_over else job.answers_file, shard, image_limits(args))
    return jobs


def run_job(job: Job, load: LazyGenerator, args: argparse.Namespace, model_id: str, shard: Shard) -> Result | None:
    """Answer (this shard of) one planned benchmark, then merge and score once every question is answered."""
    bench, options, answers_file = job.bench, options_of(args), job.answers_file
    if job.start_over:
        load()  # a checkpoint that does not load leaves the earlier answers in place
        if has_answers(answers_file):
            logger.info("%s: starting over: deleting the earlier answers in %s", bench.name, answers_file)
        remove_answers(answers_file)
    if job.adopt:
        adopted = {**job.provenance.extra, "adopted": True}
        write_provenance(answers_file, dataclasses.replace(job.provenance, extra=adopted))
    records = finalize(job.samples, answers_file) if answers_file.is_file() else None
    if records is None:
        run_shard(
            job.samples,
            answers_file,
            load,
            model_id=model_id,
            settings=job.settings,
            batch_size=args.batch_size,
            shard=shard,
            progress=not args.no_progress,
            label=bench.name,
            provenance=job.provenance,
            image_limits=image_limits(args),
            check=False,  # done by ``plan``
        )
        records = finalize(job.samples, answers_file)
    if records is None:
        done = count_answered(job.samples, answers_file)
        logger.info(
            "%s: %d of %d questions answered; the last chunk to finish merges and scores",
            bench.name,
            done,
            len(job.samples),
        )
        return None
    result = bench.score(args.data_root, records, model_id, options)
    recorded = read_provenance(answers_file)
    entry = {
        "column": bench.table_column(options),
        "headline": result.headline,
        "headline_metric": result.headline_metric,
        "source": "local" if result.headline is not None else None,
        "split": bench.split(options),
        "answers_file": str(answers_file),
        "provenance": recorded.to_json() if recorded else None,
        "metrics": dict(result.metrics),
        "files": list(result.files),
        "notes": list(result.notes),
    }
    top = {"model_id": model_id, "model_digest": job.provenance.checkpoint, "model_path": str(load.model_path)}
    top.update(reducer=job.provenance.reducer, limit=args.limit)
    update_results(results_file(args.results_dir, model_id), bench.results_key(options), entry, **top)
    return result


def evaluate(
    args: argparse.Namespace, load: LazyGenerator | None = None, replace_stale: bool = False
) -> list[tuple[Benchmark, Result | None]]:
    """Plan, then run every ``--benchmark`` of ``args`` on its one ``--model-path``; ``(benchmark, result)`` each
    (``None`` while other chunks still answer). ``load``: a generator to share between calls (the demo)."""
    model_path = args.model_path[0]
    names = list(PAPER_BENCHMARKS) if args.benchmark == ["all"] else args.benchmark
    benches = [get_benchmark(name) for name in names]
    _check_options(args, benches)
    shard = Shard.from_env(args.num_chunks, args.chunk_idx)
    if args.overwrite and shard.count > 1:
        raise UserError("--overwrite deletes every chunk's answers; run it once without chunks first")
    check_checkpoint(model_path)
    identity = model_identity(args)
    load = load or LazyGenerator(identity.path, _device(args), DTYPES.get(args.dtype), choice_from_args(args))
    image_limits(args)  # bad limits are an error before anything else
    jobs = plan(args, benches, identity, load, shard, replace_stale)
    return [(job.bench, run_job(job, load, args, identity.model_id, shard)) for job in jobs]


def image_limits(args: argparse.Namespace) -> ImageLimits:
    """The image policy training and chat apply (``llava_stf.data.images.ImageLimits``), from the flags."""
    return ImageLimits(
        max_pixels=args.max_image_pixels, max_aspect_ratio=args.max_aspect_ratio, max_bytes=args.max_image_bytes
    )


def options_of(args: argparse.Namespace) -> Options:
    return Options(args.split, args.all_rounds, args.questions, args.image_folder, args.ground_truth, args.limit)


def _check_options(args: argparse.Namespace, benches: Sequence[Benchmark]) -> None:
    own = {"--questions": args.questions, "--image-folder": args.image_folder, "--ground-truth": args.ground_truth}
    given = [flag for flag, value in own.items() if value is not None]
    others = [b.name for b in benches if not b.takes_files]
    if given and others:
        raise UserError(f"{', '.join(given)} only go with --benchmark {VQA.name}, not {', '.join(others)}")
    if any(b.takes_files for b in benches) and args.questions is None:
        raise UserError(f"--benchmark {VQA.name} needs --questions FILE (LLaVA question JSONL)")
    if args.questions is not None and args.split:
        raise UserError("--split names a file of a benchmark's own layout; with --questions give the file itself")
    for flag, path in own.items():
        if path is not None and not (path.is_dir() if flag == "--image-folder" else path.is_file()):
            raise UserError(f"{flag} {path}: no such {'folder' if flag == '--image-folder' else 'file'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llava_stf.eval",
        description="Answer, merge and score LLaVA-1.5's nine benchmarks or a question file of your own; print tables.",
    )
    parser.add_argument(
        "--benchmark", nargs="+", default=[], help=f"'all' (the paper's nine) or any of: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--model-path", nargs="+", type=Path, default=[], help="checkpoint folder(s)")
    parser.add_argument(
        "--model-id",
        nargs="+",
        default=[],
        help="name in answer files and results (default: folder name + digest, e.g. stage2-1a2b3c4d); with --table "
        "the rows to show",
    )
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
    parser.add_argument("--questions", type=Path, help="--benchmark vqa: a LLaVA question JSONL of your own")
    parser.add_argument("--image-folder", type=Path, help="--benchmark vqa: its images (default: the file's folder)")
    parser.add_argument(
        "--ground-truth", type=Path, help="--benchmark vqa: JSONL of question_id, answer (+ category) to score"
    )
    limits = ImageLimits()  # the shared image policy; an image over it is an error before any model loads
    parser.add_argument("--max-image-bytes", type=int, default=limits.max_bytes, help="largest image file (64 MiB)")
    parser.add_argument("--max-image-pixels", type=int, default=limits.max_pixels, help="largest width * height")
    parser.add_argument(
        "--max-aspect-ratio", type=float, default=limits.max_aspect_ratio, help="largest long side / short side"
    )
    parser.add_argument("--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 on GPU, float32 on CPU")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="answer again: earlier answers of these benchmarks are deleted once the inputs are checked and the "
        "model has loaded",
    )
    parser.add_argument(
        "--adopt-answers",
        action="store_true",
        help="take saved answers that have no provenance record (upstream LLaVA's) as made by this checkpoint, "
        "questions and settings",
    )
    add_reducer_flags(parser)
    parser.add_argument("--limit", type=int, help="answer and score the first N questions only (a quick look)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the combined table of --model-path(s)")
    parser.add_argument("--paper", action="store_true", help="with --table: add the published 7B rows")
    parser.add_argument("--record", nargs="+", default=[], metavar="NAME=SCORE", help="record server scores")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    args.results_dir = args.results_dir or args.data_root / "results"
    if not (args.benchmark or args.table or args.record):
        parser.error("give --benchmark, --table or --record")
    if (args.benchmark or args.record) and len(args.model_path) != 1:
        parser.error("--benchmark and --record take one --model-path (several only with --table)")
    if (args.benchmark or args.record) and len(args.model_id) > 1:
        parser.error("--benchmark and --record take one --model-id")
    if args.table and not (args.model_path or args.model_id):
        parser.error("--table needs --model-path(s) or --model-id(s)")
    if args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        parser.error("--batch-size and --max-new-tokens must be at least 1")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    return args


def _device(args: argparse.Namespace) -> torch.device:
    if args.device:
        return torch.device(args.device)
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return default_device()


def _record(args: argparse.Namespace) -> None:
    identity = model_identity(args)
    model_path, digest, model_id = identity.path, identity.digest, identity.model_id
    options = Options(split=args.split)
    for item in args.record:
        name, _, score = item.partition("=")
        bench = get_benchmark(name)
        try:
            value = float(score)
        except ValueError:
            raise UserError(f"--record {item!r}: expected NAME=SCORE with a number, e.g. vqav2=78.5") from None
        entry = {"column": bench.table_column(options), "headline": value, "headline_metric": "server",
                 "source": "server", "split": bench.split(options)}  # fmt: skip
        top = {"model_id": model_id, "model_digest": digest, "model_path": str(model_path)}
        top.update(reducer=identity.reducer.record() if identity.reducer else None, limit=args.limit)
        update_results(results_file(args.results_dir, model_id), bench.results_key(options), entry, **top)
        print(f"recorded {bench.column} = {value:.1f} for {model_id}")


def _table_ids(args: argparse.Namespace) -> list[str]:
    if args.model_id:
        return list(args.model_id)
    choice = choice_from_args(args)
    return [identity_of(path, None, choice, args.limit).model_id for path in args.model_path]


def run(args: argparse.Namespace) -> int:
    """The work of ``main`` (errors propagate; ``main`` turns expected ones into one line)."""
    scored, model_ids = False, []
    choice = choice_from_args(args)  # bad reducer flags: an error before anything else
    if choice is not None and args.model_path:
        check_checkpoint(args.model_path[0])
        resolved = choice.resolve(load_config(args.model_path[0]))
        print(resolved.describe() + ("" if resolved.changed else " (as the checkpoint has it: no change)"))
    if args.record:
        _record(args)
    if args.benchmark:
        for bench, result in evaluate(args):
            scored |= result is not None
            for line in [] if result is None else [*result.notes, *(f"wrote {f}" for f in result.files)]:
                print(f"{bench.name}: {line}")
    if args.table or scored:
        model_ids = _table_ids(args)
        rows = [(m, table_row(load_results(results_file(args.results_dir, m)))) for m in model_ids]
        if args.paper:
            rows = [*PAPER_ROWS.items(), *rows]
        print(format_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("llava_stf").setLevel(logging.INFO)
    return run_main(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
