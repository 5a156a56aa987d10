"""A few DeepSpeed ZeRO-2 stage-2 steps through the real recipe, in one process: does the shipped config run here?

Tiny towers and a generated colour data set (``train.fixtures``), ``llava_stf.train.run`` with ``--deepspeed zero2``
(the shipped ``configs/deepspeed/zero2.json``), bf16 on CUDA, fp32 on CPU. A single process needs the rank
variables a launcher would set; they are filled in when missing. Without DeepSpeed installed it reports that and exits
0: the GPU check records the step as skipped.

    python -m llava_stf.bench.deepspeed_step --device cuda --out /tmp/ds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", required=True, help="folder for the towers, the data and the run")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    result: dict = {"device": args.device, "steps": args.steps}
    if importlib.util.find_spec("deepspeed") is None:
        result.update(status="skipped", reason="deepspeed is not installed (carry its wheel: see the README)")
    else:
        for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(name, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        from ..train.arguments import parse_config
        from ..train.fixtures import save_tiny_towers, tiny_run_args, write_color_dataset
        from ..train.run import run

        out = Path(args.out)
        towers = save_tiny_towers(out / "towers")
        data = write_color_dataset(out / "data", 8 * args.steps, stage="finetune")
        cuda = args.device == "cuda"
        flags = dict(
            deepspeed="zero2", use_cpu=not cuda, bf16=cuda, max_steps=args.steps, per_device_train_batch_size=4
        )
        start = time.perf_counter()
        trainer = run(parse_config(tiny_run_args(towers, data, out / "run", "finetune", **flags)))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        result.update(
            status="ok", seconds=time.perf_counter() - start, losses=losses, engine=type(trainer.model_wrapped).__name__
        )
    print(f"deepspeed zero2 on {args.device}: " + ", ".join(f"{k}={v}" for k, v in result.items() if k != "device"))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
