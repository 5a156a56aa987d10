"""``python -m llava_stf.demo``: the main job on the embedded default, offline on a CPU in a few minutes.

``python -m llava_stf.demo [--out playground/demo] [--seed 0] [--fast | --captions | --long]`` generates the visual-QA
world, pre-trains the tiny vision tower, loads the pre-built cell-word LLM shipped with the package (``scene_llm``;
``--captions``: the previous recipe, an LLM pre-trained here on the world's captions, as ``--data`` worlds get),
trains a tiny ``mbtf_stf`` LLaVA in two stages with ``llava_stf.train.run``,
evaluates it with the ``synthetic`` benchmark, asks it one question about a generated image through ``ChatSession``,
and prints a short summary (accuracy per question family next to the same model's accuracy with a blank image,
visual tokens, FLOPs). A second run reuses every valid step (see ``pipeline``). ``--fast`` is a seconds-scale
configuration for tests (its numbers mean nothing); ``--long`` (``pipeline.LONG``) trains the ``--captions`` recipe's
stage 2 at batch 64 on 3x the scenes, past the 5-minute budget (about 6 min on 2 cores). Their run folders end
in ``-fast``, ``-captions`` or ``-long``.

``python -m llava_stf.demo --data DIR [--out playground/demo/worlds/<DIR's name>]`` runs the ``--captions``
recipe on any LLaVA-format folder: ``pretrain.json`` (caption conversations), ``finetune.json`` (instruction
conversations), images named relative to DIR, ``eval/questions.jsonl`` and ``eval/answers.jsonl`` (scored per
``category``);
``--pretrain-file``, ``--finetune-file``, ``--questions`` and ``--answers`` name other files (relative to DIR or
absolute). DIR is only read; its image size sets the tower's (see ``world``).

``python -m llava_stf.demo compare [--seeds 0 1] [--projectors ...]`` trains the seven projectors under the same
budget and seeds and writes ``results.md``, ``results.csv`` and ``results.png`` (see ``compare``).

``python -m llava_stf.demo oracle [--out playground/demo] [--seed 0]`` asks the demo's text LLM the held-out questions
with the true caption instead of the image: what it can do with perfect visual information (see ``oracle``).

``python -m llava_stf.demo build-llm [--out DIR]`` rebuilds the pre-built LLM (about 75 min on two cores; see
``scene_llm``).

``python -m llava_stf.demo probe [--out playground/demo] [--layer -2]`` fits linear probes (colour, shape, grid
position) on the frozen vision tower's features under each object: what the tower gives the LLM to read (see
``probe``).

Bad input (an ``--out`` that is a file, an unknown ``--projector``, an unwritable folder) is one ``error:`` line and
exit status 1, checked before any work (``llava_stf.errors.run_main``; ``--debug`` or ``LLAVA_STF_DEBUG=1`` shows the
traceback; the ``compare``, ``oracle`` and ``probe`` subcommands take ``LLAVA_STF_DEBUG=1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from ..errors import UserError, add_debug_flag, run_main
from .malloc import keep_freed_memory
from .pipeline import PRESETS, RunReport, add_preset_flags, format_loss, preset_suffix, run_pipeline
from .world import FILES

DEFAULT_OUT = Path("playground/demo")


def chat_once(report: RunReport) -> tuple[str, str, str]:
    """Ask the trained checkpoint one held-out question about its image; returns (question, answer, expected)."""
    from ..data.images import ImageLimits, load_image
    from ..eval.answers import read_jsonl
    from ..generation import GenerationSettings, Generator, load_checkpoint
    from ..serve.chat import ChatSession

    world = report.world
    questions = read_jsonl(world.questions)
    answers = {str(a["question_id"]): a["answer"] for a in read_jsonl(world.answers)}
    q = next((q for q in questions if q.get("category") == "color"), questions[0])
    session = ChatSession(
        Generator(*load_checkpoint(report.checkpoint)),
        load_image(world.root / q["image"], ImageLimits())[0],  # the one image policy, as training and evaluation
        GenerationSettings(max_new_tokens=16),
    )
    return q["text"].split("\n")[0], session.ask(q["text"]), answers[str(q["question_id"])]


def summary(report: RunReport, chat: tuple[str, str, str] | None) -> str:
    m, b = report.metrics, report.blank_metrics
    families = sorted(k.removeprefix("accuracy_") for k in m if k.startswith("accuracy_"))
    lines = [
        f"model {report.name}: {report.checkpoint}",
        f"  visual tokens per image: {report.image_tokens}; prefill FLOPs (image + 32 text tokens): "
        f"{report.flops / 1e6:.1f} M",
        f"  train loss: stage 1 {format_loss(report.train_loss['stage1'])}, "
        f"stage 2 {format_loss(report.train_loss['stage2'])}",
        f"  accuracy: {m['accuracy']:.1f}% of {m['questions']} held-out questions "
        f"(blank-image control: {b['accuracy']:.1f}%, what the model answers without looking)",
        *(
            f"    {f:10} {m['accuracy_' + f]:5.1f}%  (blank image {b['accuracy_' + f]:5.1f}%; {m['questions_' + f]} "
            "questions)"
            for f in families
        ),
    ]
    if chat is not None:
        lines += [f"  chat: USER {chat[0]!r}", f"        ASSISTANT {chat[1]!r}  (expected {chat[2]!r})"]
    return "\n".join(lines)


def check_arguments(out: Path, projector: str, data: Path | None = None) -> None:
    """One-line errors for an ``--out`` that cannot be a folder or lies inside ``--data`` (which is never written)
    and an unknown ``--projector``, before any work."""
    from ..model.projectors import PROJECTORS

    if data is not None and out.resolve().is_relative_to(data.resolve()):
        raise UserError(f"--out {out} is inside --data {data}: the demo never writes into the data folder")

    in_the_way = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if in_the_way is not None:
        raise UserError(f"--out {out}: {in_the_way} is a file, not a folder (--out names the artifact folder)")
    if projector not in PROJECTORS:
        raise UserError(f"unknown --projector {projector!r}; valid projectors: {', '.join(sorted(PROJECTORS))}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()  # every subcommand trains or evaluates many small steps on the CPU (see ``malloc``)
    if argv[:1] == ["compare"]:
        from .compare import main as compare_main

        return run_main(lambda: compare_main(argv[1:]))
    if argv[:1] == ["oracle"]:
        from .oracle import main as oracle_main

        return run_main(lambda: oracle_main(argv[1:]))
    if argv[:1] == ["build-llm"]:
        from .scene_llm import main as build_main

        return run_main(lambda: build_main(argv[1:]))
    if argv[:1] == ["probe"]:
        from .probe import main as probe_main

        return run_main(lambda: probe_main(argv[1:]))
    parser = argparse.ArgumentParser(prog="python -m llava_stf.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        help="artifact folder (default: playground/demo; with --data: playground/demo/worlds/<DIR's name>)",
    )
    parser.add_argument("--data", type=Path, help="a LLaVA-format folder to learn instead of the generated world")
    for key, default in FILES.items():
        flag = f"--{key}-file" if key in ("pretrain", "finetune") else f"--{key}"
        parser.add_argument(flag, type=Path, dest=f"{key}_file", help=f"with --data: relative to DIR or absolute "
                            f"(default: {default})")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="training seed (the generated world stays seed 0)")
    add_preset_flags(parser)
    parser.add_argument("--projector", default="mbtf_stf", help="projector registry name (default: mbtf_stf)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-chat", action="store_true", help="skip the chat answer")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    args.files = {key: getattr(args, f"{key}_file") for key in FILES}  # None: the default name
    if args.data is None and any(args.files.values()):
        parser.error("--pretrain-file, --finetune-file, --questions and --answers name files of --data DIR")
    if args.out is None:
        args.out = DEFAULT_OUT if args.data is None else DEFAULT_OUT / "worlds" / (args.data.resolve().name or "data")
    return run_main(lambda: demo(args), args.debug)


def demo(args: argparse.Namespace) -> int:
    check_arguments(args.out, args.projector, args.data)
    os.environ.setdefault("WANDB_MODE", "disabled")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # load reports of the towers' unused heads are expected here
    hf_logging.disable_progress_bar()
    settings = dataclasses.replace(PRESETS[args.preset], seed=args.seed, projector_type=args.projector)
    name = f"{args.projector}-seed{args.seed}{preset_suffix(args.preset)}"
    report = run_pipeline(args.out, settings, name, not args.no_progress, data=args.data, files=args.files)
    chat = None if args.no_chat else chat_once(report)
    print(summary(report, chat), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
