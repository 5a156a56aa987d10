"""The GPU check in one command: latency, bf16 parity, LoRA training throughput and a DeepSpeed step, one report.

Each step is one of the benchmarks, run in its own process with its own time cap (a step that fails or runs out of
time is recorded as such, and the others still run); each writes JSON, and this module writes one Markdown report:
the machine, the versions, every step's table, what was skipped and why, and the targets the report is judged on.
``--dry-run`` runs the same steps on the CPU with tiny shapes (minutes), so the check itself is tested in CI.
``--serve`` runs, instead, the served load test on random-weight checkpoints at 7B shapes (``bench.serve_random``:
two 7B checkpoints written to disk and served one after the other, a few minutes), with its own report
(``<date>-<device>-serve.md``): a second call where the device time allows it.

    scripts/gpu_check.sh                 # on a machine with a CUDA GPU (7B shapes, bf16); see the README
    scripts/gpu_check.sh --serve         # then, with about 8 minutes of device time left
    python -m llava_stf.bench.gpu_check --dry-run --out /tmp/report
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .gpu_report import SERVE_STEP, report


@dataclass
class Step:
    name: str
    module: str  # python -m llava_stf.bench.<module>
    args: list[str]
    cap: int  # seconds on the GPU (the dry run gets the same cap)


def steps(dry_run: bool, work: Path, serve: bool = False) -> list[Step]:
    shapes = ["--size", "tiny", "--dtype", "fp32", "--device", "cpu"] if dry_run else []
    shapes = shapes or ["--preset", "llava-v1.5-7b", "--dtype", "bf16", "--device", "cuda"]
    if serve:
        load = ["--requests", "4", "--levels", "1", "2", "--max-tokens", "3"] if dry_run else []
        return [Step(SERVE_STEP, "serve_random", [*shapes, *load], 480)]
    small = dry_run  # fewer repeats and steps on the CPU
    latency = [*shapes, "--repeats", "1" if small else "3", "--new-tokens", "4" if small else "32"]
    return [
        Step("latency, batch 1", "latency", [*latency, "--batch", "1"], 120),
        Step(
            "latency, batch 8",
            "latency",
            [*latency, "--batch", "8", "--variants", "mlp2x_gelu", "mbtf_stf", "mlp2x_gelu+fastv"],
            120,
        ),  # fmt: skip
        Step(
            "reducers at 64 and 192 tokens, batch 8",
            "latency",
            [
                *latency,
                "--batch",
                "8",
                "--reducers",
                "all",
                "--tokens",
                *(["24", "32"] if small else ["64", "192"]),
                "--also",
                "mbtf_stf",
                "tokenpacker",
            ],
            150,
        ),  # fmt: skip
        Step("bf16 parity", "parity", [*shapes, "--prompts", "4" if small else "16", "--new-tokens", "8"], 120),
        Step(
            "LoRA stage-2 steps",
            "lora_steps",
            [
                *shapes,
                *(
                    ["--batch", "2", "--text-tokens", "16", "--lora-r", "8", "--steps", "2", "--warmup", "1"]
                    if small
                    else []
                ),
            ],
            150,
        ),  # fmt: skip
        Step(
            "DeepSpeed ZeRO-2",
            "deepspeed_step",
            ["--device", "cpu" if dry_run else "cuda", "--out", str(work / "ds")],
            90,
        ),  # fmt: skip
    ]


def run_step(index: int, step: Step, work: Path) -> dict:
    out = work / f"step{index}.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", f"llava_stf.bench.{step.module}", *step.args, "--json", str(out)]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=step.cap, env=env)
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        log = done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        status, log = f"timed out after {step.cap} s", (error.stdout or b"").decode(errors="replace")
    result = json.loads(out.read_text()) if out.is_file() else None
    if isinstance(result, dict) and result.get("status") == "skipped":
        status = f"skipped: {result.get('reason')}"
    table = [line for line in log.splitlines() if "%|" not in line and "it/s]" not in line]
    return {"step": step, "status": status, "seconds": time.perf_counter() - start, "log": table, "json": result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU and tiny shapes: checks the check itself")
    parser.add_argument("--serve", action="store_true", help="only the served load test (bench.serve_random)")
    parser.add_argument("--out", default=None, help="report folder (default: $OUT if set, else docs/gpu)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here; use --dry-run to run the same steps on the CPU", file=sys.stderr)
        return 2
    folder = Path(args.out or os.environ.get("OUT") or "docs/gpu")
    folder.mkdir(parents=True, exist_ok=True)
    device = "dry-run" if args.dry_run else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    path = folder / f"{datetime.date.today().isoformat()}-{device}{'-serve' if args.serve else ''}.md"
    start, results = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        for index, step in enumerate(steps(args.dry_run, Path(work), args.serve)):
            results.append(run_step(index, step, Path(work)))
            print(f"{step.name}: {results[-1]['status']} ({results[-1]['seconds']:.0f} s)", flush=True)
    path.write_text(report(results, args.dry_run, time.perf_counter() - start, args.serve))
    print(f"wrote {path}")
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
