"""Training throughput of the LLaVA-1.5 projector and LLaVA-STF's side by side: ``python -m llava_stf.bench.train``.

Both projectors train the same generated stage-2 data through the real recipe (``llava_stf.train.run``: dataset,
collator, ``LlavaStfTrainer``) on the same small towers, one fresh process each, one after the other. The default
size makes the LLM dominate: a CLIP-style tower (hidden 64, 9 blocks, 224 px, patch 14: 256 patches) in front of a
Llama (hidden 512, 6 layers, FFN 1376); ``mlp2x_gelu`` hands the LLM 256 tokens per image, ``mbtf_stf`` 64.
Reported after ``--warmup`` untimed steps: samples/s, LLM tokens/s (attention-mask tokens) and peak memory (CUDA:
``max_memory_allocated``; CPU: peak RSS of the process minus its RSS before training).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from transformers import TrainerCallback

from llava_stf.train.arguments import parse_config
from llava_stf.train.fixtures import save_tiny_towers, tiny_run_args, write_color_dataset
from llava_stf.train.run import run


class Timer(TrainerCallback):
    """Wall time and tokens between the end of step ``warmup`` and the end of training."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.stop, self.tokens = warmup, None, None, (0, 0)

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.start, self.tokens = self._now(), (state.num_input_tokens_seen, 0)
        if state.global_step == state.max_steps:
            self.stop, self.tokens = self._now(), (self.tokens[0], state.num_input_tokens_seen)


def rss_mib() -> float:
    """Current resident set size (Linux ``/proc``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def measure(projector: str, towers, data: Path, out: Path, args: argparse.Namespace) -> dict:
    """Train ``args.warmup + args.steps`` steps with ``projector``; runs in its own process."""
    cuda = args.device == "cuda"
    if not cuda and args.threads:
        torch.set_num_threads(args.threads)
    flags = dict(projector_type=projector, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch,
                 learning_rate=2e-5, logging_steps=10_000,
                 use_cpu=not cuda, bf16=cuda, model_max_length=2048)  # fmt: skip
    timer = Timer(args.warmup)
    config = parse_config(tiny_run_args(towers, data, out / projector, args.stage, **flags))
    config.training.include_num_input_tokens_seen = "non_padding"  # the CLI parser only takes a bool here
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = rss_mib()
    trainer = run(config, callbacks=[timer])
    seconds = timer.stop - timer.start
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before  # ru_maxrss is in KiB on Linux
    return {
        "projector": projector,
        "image_tokens": trainer.model.config.num_image_tokens,
        "samples_per_s": args.steps * args.batch / seconds,
        "tokens_per_s": (timer.tokens[1] - timer.tokens[0]) / seconds,
        "peak_mib": peak,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--projectors", nargs="+", default=["mlp2x_gelu", "mbtf_stf"], help="first one is the base")
    parser.add_argument("--stage", default="finetune", choices=["pretrain", "finetune", "lora"])
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--llm-hidden", type=int, default=512)
    parser.add_argument("--llm-layers", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    hidden = args.llm_hidden
    text = dict(hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=args.llm_layers,
                num_attention_heads=max(4, hidden // 64), num_key_value_heads=max(4, hidden // 64))  # fmt: skip
    towers = save_tiny_towers(root / "towers", dict(image_size=args.image_size, patch_size=14), text)
    stage = "pretrain" if args.stage == "pretrain" else "finetune"
    data = write_color_dataset(root / "data", args.batch * (args.warmup + args.steps), stage=stage,
                               image_size=(args.image_size, args.image_size), multi_turn_every=3)  # fmt: skip
    rows = []
    for projector in args.projectors:  # one fresh process each: separate peaks, no shared warm state
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows.append(pool.submit(measure, projector, towers, data, root / "out", args).result())

    print(
        f"stage {args.stage} on {args.device}: LLM hidden {hidden} x {args.llm_layers} layers, CLIP hidden 64 x 9 "
        f"at {args.image_size} px (patch 14), batch {args.batch}, {args.steps} timed steps after {args.warmup}"
    )
    print(f"{'projector':<12} {'img tokens':>10} {'samples/s':>10} {'tokens/s':>10} {'peak MiB':>9}")
    for r in rows:
        print(
            f"{r['projector']:<12} {r['image_tokens']:>10} {r['samples_per_s']:>10.2f} "
            f"{r['tokens_per_s']:>10.0f} {r['peak_mib']:>9.0f}"
        )
    base = rows[0]
    for r in rows[1:]:
        ratios = {k: r[k] / base[k] for k in ("samples_per_s", "tokens_per_s", "peak_mib")}
        print(
            f"ratio {r['projector']} / {base['projector']}: samples/s {ratios['samples_per_s']:.2f}x, "
            f"tokens/s {ratios['tokens_per_s']:.2f}x, peak memory {ratios['peak_mib']:.2f}x"
        )


if __name__ == "__main__":
    main()
