"""scripts/gpu_check.sh --dry-run: every step of the GPU check runs on the CPU and lands in one report.

The real run needs a CUDA GPU (7B shapes, bf16); this keeps the script from first failing on the borrowed machine.
Figures are printed, never asserted (tiny shapes on a shared CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = [
    "latency, batch 1",
    "latency, batch 8",
    "reducers at 64 and 192 tokens, batch 8",
    "bf16 parity",
    "LoRA stage-2 steps",
    "DeepSpeed ZeRO-2",
]


@pytest.mark.slow
def test_dry_run_writes_a_report_with_every_step(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    done = subprocess.run([ROOT / "scripts" / "gpu_check.sh", "--dry-run", "--out", tmp_path], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (report,) = tmp_path.glob("*-dry-run.md")
    text = report.read_text()
    for step in STEPS:
        assert f"## {step}: ok (" in text, step
    assert "KV-cache MB per image" in text and "LoRA stage-2 samples/s" in text and "batch vs one by one" in text
    assert "torch " in text and "transformers 5." in text  # versions recorded


@pytest.mark.slow
def test_serve_dry_run_writes_its_own_report_with_the_served_targets(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    done = subprocess.run([ROOT / "scripts" / "gpu_check.sh", "--serve", "--dry-run", "--out", tmp_path], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (report,) = tmp_path.glob("*-dry-run-serve.md")  # beside the full check's report, not over it
    text = report.read_text()
    assert "`scripts/gpu_check.sh --serve --dry-run`" in text and "## served load test, random weights: ok (" in text
    assert "- served: mbtf_stf / mlp2x_gelu requests/s at c2 = " in text
    assert "- served: LLM prompt tokens per request: mlp2x_gelu " in text and "## latency" not in text


def test_without_a_gpu_the_real_run_refuses_in_one_line(tmp_path):
    from llava_stf.bench import gpu_check

    if gpu_check.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())
