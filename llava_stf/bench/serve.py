"""``python -m llava_stf.bench.serve``: load test of the OpenAI-compatible API at concurrency 1, 4, 16, side by side.

    python -m llava_stf.bench.serve --model-path playground/demo/mlp2x_gelu-seed0/stage2 \\
        playground/demo/mbtf_stf-seed0/stage2 --data-root playground/demo/synthetic

For each checkpoint the server (``python -m llava_stf.serve.api``) starts in a subprocess on 127.0.0.1 (a free
port), answers two warm-up requests, then each level sends ``--requests`` streamed, greedy chat completions (question
and image of the demo world, or generated images without ``--data-root``) from that many concurrent clients, each the
official ``openai`` client without retries, stopping early after ``--time-limit`` seconds. Per level: requests/s,
p50/p99 latency, p50 time to the first content token, errors (must be 0), that every request got exactly one answer,
and the server's mean batch size. Greedy answers must not depend on the batch: each question's answer is checked to
be the same at every level. Then, in this process, the server's engine alone answers the same questions in batches
of each level's size (``serve_engine``, ``--engine-repeats``; 0 skips it): its milliseconds per request show what
batching and fewer image tokens save in generation itself, without the HTTP and client CPU that share a laptop's
cores with it, and its answers must equal the served ones. Targets (CPU, demo-size checkpoints): requests/s at
concurrency 16 >= 4x concurrency 1, and an ``mbtf_stf`` checkpoint >= 1.5x an ``mlp2x_gelu`` one at concurrency 16
(projectors read from each checkpoint's config), each printed as ``meets`` or ``MISSES``; the engine's ratios are
printed beside them, and two ceilings that explain a miss: the most requests/s the clients themselves can send (all
of them are asyncio tasks in this one process, so one core at the CPU per request they used at the top level), and
the ratio of the checkpoints' LLM prompt tokens per request (``usage`` of one non-streamed request: text and image
tokens), the most fewer image tokens can save where the LLM's prefill is the whole cost. The exit status is 1 when a
request failed or got other than one answer, or answers changed with the level (``--no-answer-check``: reported
only); missed targets are reported, not failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from ..errors import UserError, add_debug_flag, run_main
from .serve_engine import measure_engine
from .serve_load import ServerProcess, demo_questions, generated_questions, prompt_usage, run_level
from .serve_report import Run, engine_table, load_text, record, table
from .serve_targets import ceilings, engine_ratios, targets


def build_parser() -> argparse.ArgumentParser:
    description = __doc__.splitlines()[0].split(": ", 1)[1]
    parser = argparse.ArgumentParser(prog="python -m llava_stf.bench.serve", description=description)
    parser.add_argument("--model-path", type=Path, nargs="+", required=True, help="checkpoint folder(s)")
    parser.add_argument("--data-root", type=Path, help="the demo world (playground/demo/synthetic); else generated")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per level")
    parser.add_argument("--requests", type=int, default=48, help="requests per level")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per level (stop sending after)")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request (demo eval: 16)")
    parser.add_argument("--questions", type=int, default=64, help="distinct questions to cycle through")
    parser.add_argument("--timeout", type=float, default=120.0, help="client timeout per request, seconds")
    parser.add_argument(
        "--server-threads",
        type=int,
        default=1,
        help="the server's torch threads (demo-size models gain nothing from more, and the clients share the CPUs)",
    )
    parser.add_argument(
        "--engine-repeats", type=int, default=3, help="timed passes of the engine alone per batch size (0: skip it)"
    )
    parser.add_argument(
        "--no-answer-check",
        dest="answer_check",
        action="store_false",
        help="report, do not fail on, answers that change with the level (random weights in 16 bits: near-ties)",
    )
    parser.add_argument("--server-args", default="", help="more server flags, e.g. '--max-batch 8 --batch-window-ms 5'")
    parser.add_argument("--json", type=Path, help="also write the results here")
    add_debug_flag(parser)
    return parser


def projector_of(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text()).get("projector_type")
    except (OSError, ValueError):
        return None


def measure(path: Path, args: argparse.Namespace, questions) -> Run:
    server_args = ["--threads", str(args.server_threads), *shlex.split(args.server_args)]
    with ServerProcess(path, server_args) as server:
        print(f"{server.model_id}: serving at {server.base_url}", file=sys.stderr)
        warm = run_level(server, questions, 1, 2, args.time_limit, args.max_tokens, args.timeout)
        if warm.errors:
            raise UserError(f"{path}: the warm-up request failed: {warm.outcomes[0].error}")
        prompt, images = prompt_usage(server, questions[0], args.max_tokens)
        levels = []
        for concurrency in args.levels:
            levels.append(
                run_level(server, questions, concurrency, args.requests, args.time_limit, args.max_tokens, args.timeout)
            )
            print(f"  concurrency {concurrency}: {levels[-1].rps:.2f} requests/s", file=sys.stderr)
    answers: dict[int, set[str]] = {}
    for level in levels:
        for outcome in level.done:
            answers.setdefault(outcome.index % len(questions), set()).add(outcome.answer)
    engine = []
    if args.engine_repeats > 0:
        engine = measure_engine(path, questions, args.levels, args.engine_repeats, args.server_threads, args.max_tokens)
        for level in engine:
            for i, answer in enumerate(level.answers):
                answers.setdefault(i % len(questions), set()).add(answer)
        print(
            f"  engine alone: {', '.join(f'batch {e.batch} {e.ms_per_request:.1f} ms' for e in engine)}",
            file=sys.stderr,
        )
    consistent = all(len(found) == 1 for found in answers.values())
    return Run(path, server.model_id, projector_of(path), levels, consistent, engine, prompt, images)


def run(args: argparse.Namespace) -> int:
    if any(level < 1 for level in args.levels) or args.requests < 1 or args.max_tokens < 1 or args.questions < 1:
        raise UserError("--levels, --requests, --max-tokens and --questions must be >= 1")
    for path in args.model_path:
        if not (path / "config.json").is_file():
            raise UserError(f"not a checkpoint folder (no config.json): {path}")
    questions = (
        demo_questions(args.data_root, args.questions) if args.data_root else generated_questions(args.questions)
    )
    load_before = os.getloadavg()
    runs = [measure(path, args, questions) for path in args.model_path]
    load_after = os.getloadavg()
    print(table(runs))
    for line in [*targets(runs), *ceilings(runs)]:
        print(line)
    if any(r.engine for r in runs):
        print(engine_table([r for r in runs if r.engine], args.server_threads))
        for line in engine_ratios(runs):
            print(line)
    for run_ in runs:
        also = " and from the engine alone" if run_.engine else ""
        print(f"{run_.model_id}: answers identical at every level{also}: {'yes' if run_.consistent else 'NO'}")
    before, after = load_text(load_before), load_text(load_after)
    print(f"load average (1/5/15 min): before {before}, after {after}; {os.cpu_count()} CPUs")
    failed = [
        f"{r.model_id} c{level.concurrency}"
        for r in runs
        for level in r.levels
        if level.errors or not level.one_answer_each
    ]
    for r in runs:
        for level in r.levels:
            for outcome in level.outcomes:
                if outcome.error:
                    print(
                        f"error: {r.model_id} c{level.concurrency} request {outcome.index}: {outcome.error}",
                        file=sys.stderr,
                    )
    if args.json:
        args.json.write_text(json.dumps(record(runs, load_before, load_after), indent=1))
    return 1 if failed or (args.answer_check and not all(r.consistent for r in runs)) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
