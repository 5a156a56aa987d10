"""Timing one prefill by parts: forward hooks on the tower, projector and LLM (and an in-LLM reducer's choices),
CUDA-synchronised wall clock."""

from __future__ import annotations

import time

import torch
from transformers import LogitsProcessor


class Clock(LogitsProcessor):
    """Wall time (CUDA synchronised) at named forward-hook points, and at every generation step (``steps``)."""

    def __init__(self, device: torch.device):
        self.device, self.marks, self.steps = device, {}, []

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def hook(self, name: str, last: bool = False):
        """A hook that marks ``name`` at its first call (``last``: at its last call, e.g. the end of a module that a
        reducer may also call on the way, such as DART's use of the final norm)."""

        def record(*_) -> None:  # returns None: a pre-hook must not replace the module's input
            if last:
                self.marks[name] = self.now()
            else:
                self.marks.setdefault(name, self.now())

        return record

    def __call__(self, input_ids, scores):
        self.steps.append(self.now())
        return scores


def prefill(model, ids, pixels, clock: Clock, image_sizes=None) -> tuple[dict[str, float], object, int]:
    """One timed prefill: ``(times, outputs, tokens through the last LLM layer)``.

    ``pixels``: ``[B, 3, S, S]``, or AnyRes ``[B, crops, 3, S, S]`` with ``image_sizes`` ``[B, 2]`` (the vision tower
    and the projector then run once over every crop).
    """
    inner, lm, lengths = model.model, model.model.language_model, []
    parts = {"vision": inner.vision_tower, "proj": inner.multi_modal_projector}
    hooks = [m.register_forward_pre_hook(clock.hook(f"{n}0")) for n, m in parts.items()]
    hooks += [m.register_forward_hook(clock.hook(f"{n}1", last=True)) for n, m in parts.items()]
    hooks += [
        lm.layers[0].register_forward_pre_hook(clock.hook("llm0")),
        lm.norm.register_forward_hook(clock.hook("llm1", last=True)),
    ]
    hooks += [lm.layers[-1].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))]
    reducer, spent = getattr(lm, "reducer", None), []  # an in-LLM reducer: time its choices inside the LLM
    if reducer is not None:
        select = reducer.select

        def timed_select(view):
            begin = clock.now()
            chosen = select(view)
            spent.append(clock.now() - begin)
            return chosen

        reducer.select = timed_select  # an instance attribute for this call only (removed below)
    clock.marks, start = {}, clock.now()
    try:
        sizes = {} if image_sizes is None else {"image_sizes": image_sizes}
        out = model(input_ids=ids, pixel_values=pixels, **sizes, use_cache=True, logits_to_keep=1)
    finally:
        if reducer is not None:
            del reducer.select
        for hook in hooks:
            hook.remove()
    m, end = clock.marks, clock.now()
    reduce = m["proj0"] - m["vision1"] + sum(spent)  # vision side: tower end to projector; in-LLM: its choices
    times = dict(prefill=end - start, vision=m["vision1"] - m["vision0"], reducer=reduce)
    return dict(times, projector=m["proj1"] - m["proj0"], llm=m["llm1"] - m["llm0"]), out, lengths[0]
