"""``python -m llava_stf.demo oracle``: the demo's text LLM answering from the true caption instead of the image.

The multimodal model can only answer what its LLM can work out from what the projector gives it. This asks the
demo's pre-trained tiny Llama (``llm-seed<n>``, before any multimodal stage) every held-out question with the
scene's ground-truth caption in front of it, in the format of its text pre-training (``llm.world_documents``:
caption, then question and answer), and scores the greedy answers with the ``synthetic`` benchmark's scorer. It
shows what the LLM can do with perfect visual information before the multimodal stages: stage 1 (LLM frozen) can
give it no more, and a family at chance here is a skill stage 2 has to teach the LLM from scratch, whatever the
projector does. Run after ``python -m llava_stf.demo`` (it reuses that folder's world and LLM).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from ..data.synthetic import Scene, caption
from ..eval.answers import read_jsonl
from ..eval.benchmarks.synthetic import score_synthetic


def caption_prompt(scene: Scene, question: str) -> str:
    """The scene's caption, then the question (with its answer-format suffix), as in the LLM's pre-training text."""
    return f"{caption(scene)}\n{question}\n"


@torch.no_grad()
def caption_oracle(llm: Path, data: Path, limit: int | None = None, max_new_tokens: int = 8) -> dict[str, Any]:
    """Greedy answers of the text LLM in ``llm`` to ``data``'s held-out questions given their scenes' captions;
    returns the ``synthetic`` metrics (accuracy overall and per family, percent)."""
    tokenizer = AutoTokenizer.from_pretrained(llm)
    model = LlamaForCausalLM.from_pretrained(llm).eval()
    scenes = {s["image"]: Scene.from_json(s) for s in read_jsonl(data / "scenes.jsonl")}
    questions = read_jsonl(data / "eval" / "questions.jsonl")[:limit]
    truth = {a["question_id"]: a for a in read_jsonl(data / "eval" / "answers.jsonl")}
    predictions = {}
    for q in questions:
        ids = tokenizer(caption_prompt(scenes[q["image"]], q["text"]), return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        predictions[q["question_id"]] = text.strip().split("\n")[0]  # one line: the LLM runs on into a next question
    answers = {qid: truth[qid]["answer"] for qid in predictions}
    return score_synthetic(predictions, answers, {qid: truth[qid]["family"] for qid in predictions})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_stf.demo oracle", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("playground/demo"), help="the demo's artifact folder")
    parser.add_argument("--seed", type=int, default=0, help="which llm-seed<n> to ask")
    parser.add_argument("--limit", type=int, help="only the first N questions")
    args = parser.parse_args(argv)
    llm, data = args.out / f"llm-seed{args.seed}", args.out / "synthetic"
    if not (llm / "config.json").is_file() and (data / "scenes.jsonl").is_file():
        from .scene_llm import PREBUILT, read_build

        record = read_build(PREBUILT) or {}
        score = record.get("held_out_accuracy", {})
        families = ", ".join(f"{k} {v}%" for k, v in score.items() if k != "overall")
        print(f"{args.out} has no caption-trained llm-seed{args.seed} (only --captions, --long and --data runs make "
              f"one); the default demo's LLM is the pre-built cell-word LLM ({PREBUILT}): given the true cells of "
              f"held-out scenes it answers {score.get('overall', 'n/a')}% ({families}), "
              "from its build.json")  # fmt: skip
        return 0
    missing = [str(p) for p in (llm / "config.json", data / "scenes.jsonl") if not p.is_file()]
    if missing:
        hint = f"run `python -m llava_stf.demo --out {args.out}` first"
        raise SystemExit(f"error: {', '.join(missing)} not found; {hint}")
    m = caption_oracle(llm, data, args.limit)
    families = sorted(k.removeprefix("accuracy_") for k in m if k.startswith("accuracy_"))
    print(f"text LLM {llm} given the true caption: {m['accuracy']:.1f}% of {m['questions']} questions")
    for f in families:
        print(f"    {f:10} {m['accuracy_' + f]:5.1f}%  ({m['questions_' + f]} questions)")
    return 0


__all__ = ["caption_oracle", "caption_prompt", "main"]
