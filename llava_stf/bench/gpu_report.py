"""The GPU check's report: machine, versions, the targets it is judged on, and each step's table."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform

import torch

SERVE_STEP = "served load test, random weights"  # gpu_check --serve's one step, whose targets the report lists


def versions() -> str:
    names = ["torch", "transformers", "tokenizers", "accelerate", "peft", "deepspeed", "safetensors"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return f"Python {platform.python_version()}; " + ", ".join(found)


def machine() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, {os.cpu_count()} CPU cores"
    return f"CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def targets(results: list[dict]) -> list[str]:
    """The headline ratios the GPU report is judged on, from the steps' JSON (missing steps say so)."""
    by = {r["step"].name: r["json"] for r in results}

    def rows(name: str) -> dict:
        data = by.get(name) or {}
        return {r.get("spec", r.get("variant", r.get("projector"))): r for r in data.get("rows", [])}

    lines, b1, b8 = [], rows("latency, batch 1"), rows("latency, batch 8")
    base, stf = b1.get("mlp2x_gelu"), b1.get("mbtf_stf")
    if base and stf:
        speedup = base["times"]["prefill"] / stf["times"]["prefill"]
        flops = base["prefill_flops"] / stf["prefill_flops"]
        lines.append(f"mbtf_stf TTFT speed-up at batch 1: {speedup:.2f}x vs whole-prefill FLOPs ratio {flops:.2f}x "
                     f"= {speedup / flops:.0%} (target >= 85%)")  # fmt: skip
        lines.append(f"KV-cache MB per image: {stf['kv_bytes'] / 2**20:.1f} vs {base['kv_bytes'] / 2**20:.1f} "
                     f"= {stf['kv_bytes'] / base['kv_bytes']:.2f} (target about 0.25)")  # fmt: skip
    if b8.get("mlp2x_gelu") and b8.get("mbtf_stf"):
        ratio = b8["mbtf_stf"]["decode_tps"] / b8["mlp2x_gelu"]["decode_tps"]
        lines.append(f"decode tokens/s at batch 8, mbtf_stf / mlp2x_gelu: {ratio:.2f} (target >= 1)")
    lora = rows("LoRA stage-2 steps")
    if lora.get("mlp2x_gelu") and lora.get("mbtf_stf"):
        ratio = lora["mbtf_stf"]["samples_per_s"] / lora["mlp2x_gelu"]["samples_per_s"]
        lines.append(f"LoRA stage-2 samples/s, mbtf_stf / mlp2x_gelu: {ratio:.2f}x (target >= 2x)")
    for variant, r in rows("bf16 parity").items():
        tied = r.get("tokens_equal_or_tie_batch_vs_single")
        tied = "" if tied is None else f"; identical or first diverging at a near-tie (gap <= {r['tie_margin']:.3g}): "
        tied += "" if not tied else f"{r['tokens_equal_or_tie_batch_vs_single']:.0%} (target >= 99%)"
        lines.append(f"{variant}: batch vs one by one, identical greedy tokens on "
                     f"{r['tokens_equal_batch_vs_single']:.0%} of prompts{tied}")  # fmt: skip
    served = by.get(SERVE_STEP) or {}
    lines += [f"served: {line}" for line in [*served.get("targets", []), *served.get("ceilings", [])]]
    return lines or ["no step produced the figures the targets need"]


def report(results: list[dict], dry_run: bool, total: float, serve: bool = False) -> str:
    today = datetime.date.today().isoformat()
    head = "GPU check (dry run: CPU, tiny shapes; figures not judged)" if dry_run else "GPU check"
    out = [f"# {head}, {today}", "", f"- machine: {machine()}", f"- versions: {versions()}",
           f"- command: `scripts/gpu_check.sh{' --serve' if serve else ''}{' --dry-run' if dry_run else ''}`, "
           f"{total:.0f} s in all", "",
           "## Targets", "", *[f"- {line}" for line in targets(results)], ""]  # fmt: skip
    for r in results:
        step = r["step"]
        out += [f"## {step.name}: {r['status']} ({r['seconds']:.0f} s, cap {step.cap} s)", ""]
        out += [
            f"`python -m llava_stf.bench.{step.module} {' '.join(step.args)}`",
            "",
            "```",
            *r["log"][-60:],
            "```",
            "",
        ]
    return "\n".join(out)


__all__ = ["SERVE_STEP", "machine", "report", "targets", "versions"]
