"""Text pre-training of the demo's tiny Llama on the generated world's text (the demo's stand-in for Vicuna).

LLaVA starts from a pre-trained LLM: stage 1 trains only the projector against a frozen LLM, which is useless when
that LLM is random (it cannot read the captions the projector should map onto). This trains the from-scratch tiny
Llama as a plain causal LM on the world's text (``world_documents``: captions, and instruction records preceded by
their scene's caption; no images) for a fixed number of steps before stage 1.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def world_documents(pretrain: Path, finetune: Path) -> list[str]:
    """The LLM's text corpus: every caption alone, and every instruction record as one document, preceded by the
    caption of its scene when it has one (so the LLM learns to answer from a described scene, as a pre-trained LLM
    can, before the projector must learn to describe the scene to it). ``<image>`` tags are removed.

    Args:
        pretrain: LLaVA caption records (the caption: the first ``gpt`` turn of each record with an image).
        finetune: LLaVA instruction records (any number of turns; text-only records stand alone).
    """
    captions = {r["image"]: next(t["value"] for t in r["conversations"] if t["from"] == "gpt")
                for r in json.loads(pretrain.read_text()) if r.get("image")}  # fmt: skip
    docs = list(captions.values())
    for record in json.loads(finetune.read_text()):
        turns = "\n".join(t["value"].replace("<image>", "").strip() for t in record["conversations"])
        docs.append(f"{captions[record['image']]}\n{turns}" if record.get("image") in captions else turns)
    return docs


def pretrain_text(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    steps: int,
    lr: float,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
    max_tokens: int | None = None,
) -> float:
    """Train ``model`` in place with next-token loss on ``texts`` (each one document: BOS + text + EOS, every token
    trained on); returns the mean loss of the last 10 steps (``nan`` when ``steps`` is 0).

    ``max_tokens``: each document's first tokens only (the stages' ``model_max_length``: a long multi-turn record of
    a world of one's own must not make every step as long as the longest record)."""
    if not texts:
        raise ValueError("pretrain_text: no texts to train on")
    eos = tokenizer.eos_token_id
    docs = [(tokenizer(t)["input_ids"] + [eos])[:max_tokens] for t in texts]
    return train_lm(model, [(d, d) for d in docs], steps, lr, eos, batch_size, seed, progress)


def pad_batch(docs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """``(input_ids, labels, attention_mask)``, each (batch, width), of ``(input_ids, labels)`` documents padded to the
    longest with ``pad_id`` / -100 / 0."""
    width = max(len(ids) for ids, _ in docs)
    ids = torch.tensor([d + [pad_id] * (width - len(d)) for d, _ in docs])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in docs])
    mask = torch.tensor([[1] * len(d) + [0] * (width - len(d)) for d, _ in docs])
    return ids, labels, mask


def train_lm(model: LlamaForCausalLM, docs: list[tuple[list[int], list[int]]], steps: int, lr: float, pad_id: int,
             batch_size: int = 32, seed: int = 0, progress: bool = False, desc: str = "llm (text pre-training)",
             after_step: Callable[[], None] | None = None) -> float:  # fmt: skip
    """Train ``model`` in place on ``docs`` (``(input_ids, labels)``, [T] each; ``labels`` -100 where not trained
    on) with AdamW and a one-cycle schedule, ``batch_size`` documents per step in shuffled epochs, padded with
    ``pad_id`` (masked); returns the mean loss of the last 10 steps (``nan`` when ``steps`` is 0). ``after_step``:
    called after every optimiser step."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=max(steps, 1), pct_start=0.1)
    model.train()
    order: list[int] = []
    losses: list[float] = []
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        if len(order) < batch_size:
            order += rng.sample(range(len(docs)), len(docs))
        batch, order = [docs[i] for i in order[:batch_size]], order[batch_size:]
        ids, labels, mask = pad_batch(batch, pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if after_step is not None:
            after_step()
    model.eval()
    tail = losses[-10:]
    final = sum(tail) / len(tail) if tail else float("nan")
    logger.info("%s: %d steps, final loss %.3f", desc, steps, final)
    return final


__all__ = ["pad_batch", "pretrain_text", "train_lm", "world_documents"]
