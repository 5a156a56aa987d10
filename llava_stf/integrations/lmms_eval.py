"""The ``llava_stf`` model for lmms-eval: ``lmms-eval --model llava_stf --model_args pretrained=CKPT --tasks ...``.

``LlavaStfLmms`` is an lmms-eval *simple* model (``is_simple = True``): each ``generate_until`` request carries the
task's prompt text (``context``), its generation kwargs and ``doc_to_visual``. The context becomes one human turn of
a ``llava_stf.generation.Request`` (with ``<image>\\n`` in front when the doc has an image and the context holds no
tag, as lmms-eval's own ``llava`` model does), and ``Generator`` - the project's only generation code - wraps it in
the conversation template saved with the checkpoint, generates in left-padded batches and stops at EOS.
Requests are grouped by their generation settings, longest context first within a group, and answers are returned
in request order; a task's ``until`` strings cut the answer at the first one found.

Mapping of ``gen_kwargs``: ``max_new_tokens`` (default 1024 here when a task gives none, as lmms-eval's ``llava``);
``temperature`` 0 or missing is greedy and > 0 samples (``do_sample`` is ignored, as lmms-eval's ``llava`` and
``llava_hf`` do), and then ``top_p`` applies; any other key that is a field of ``GenerationSettings`` is passed on;
``use_cache``, ``image_aspect_ratio`` (the checkpoint's processor decides the image mode), ``top_p``/``top_k`` when
greedy and ``num_beams``/``repetition_penalty`` at 1 are dropped; anything else (beam search, ``top_k`` sampling, a
repetition penalty) is an error naming the key, never a silently different decoding.

Only generation tasks run: ``loglikelihood`` (``multiple_choice`` tasks) and multi-round generation raise
``NotImplementedError``. A doc with more than one image, or a visual that is not a PIL image (video, audio), is an
error naming the task and doc. The pure helpers (``build_request``, ``generation_settings``, ``cut_at_stop``,
``plan_batches``) import without lmms-eval; the class needs it and says how to install it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.conversation import IMAGE_TOKEN
from ..generation import GenerationSettings, Generator, Request
from ..loading import DTYPES
from . import LMMS_EVAL_INSTALL_HINT

try:
    from lmms_eval.api.model import lmms
except ImportError as error:  # lmms-eval is an optional extra; the class explains how to install it when built
    _LMMS_IMPORT_ERROR: ImportError | None = error
    lmms = object  # type: ignore[assignment,misc]
else:
    _LMMS_IMPORT_ERROR = None

DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's llava / llava_hf default when a task sets no max_new_tokens
ALWAYS_IGNORED = frozenset({"do_sample", "use_cache", "image_aspect_ratio"})  # lmms-eval samples iff temperature > 0
SAMPLING_ONLY = frozenset({"top_p", "top_k"})  # cannot change a greedy answer
GREEDY_VALUES = {"num_beams": 1, "repetition_penalty": 1}  # key: the value that leaves greedy decoding unchanged


def flatten_visuals(visuals: Any) -> list[Any]:
    """``doc_to_visual``'s output (None, one item, or nested lists) as a flat list."""
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    return [item for v in visuals for item in flatten_visuals(v)]


def build_request(context: str, visuals: Any) -> Request:
    """One lmms-eval prompt and its doc's visuals as a ``Generator`` request.

    Args:
        context: The task's prompt text (``doc_to_text``), without any conversation template.
        visuals: ``doc_to_visual(doc)``: no image, or exactly one PIL image (nested lists are flattened).

    Raises:
        TypeError: If ``context`` is not a string or a visual is not a PIL image.
        ValueError: If there is more than one image, or more ``<image>`` tags in ``context`` than images.
    """
    if not isinstance(context, str):
        raise TypeError(f"a generate_until context must be a string, got {type(context).__name__}")
    items = flatten_visuals(visuals)
    for item in items:
        if not isinstance(item, Image.Image):
            raise TypeError(
                f"llava_stf takes PIL images only; doc_to_visual gave a {type(item).__name__} (video and audio tasks "
                "are not supported)"
            )
    if len(items) > 1:
        raise ValueError(f"llava_stf answers with one image per question; this doc has {len(items)} images")
    tags = context.count(IMAGE_TOKEN)
    if tags > len(items):
        raise ValueError(f"the context holds {tags} {IMAGE_TOKEN!r} tag(s) but the doc has {len(items)} image(s)")
    return Request.single(context, items[0] if items else None)


def generation_settings(
    gen_kwargs: Mapping[str, Any], default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
) -> tuple[GenerationSettings, tuple[str, ...]]:
    """A task's ``gen_kwargs`` as ``(GenerationSettings, stop strings)`` (see the module docstring for the rules).

    Raises:
        ValueError: For a malformed ``until``, a non-positive ``max_new_tokens``, or a setting ``Generator`` cannot
            honour (sampling, beam search), naming the key and the supported ones.
    """
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", ())
    if isinstance(until, str):
        until = (until,)
    if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
        raise ValueError(f"gen_kwargs 'until' must be a string or a list of strings, got {until!r}")
    fields = {f.name for f in dataclasses.fields(GenerationSettings)}
    max_new_tokens = kwargs.pop("max_new_tokens", None)
    chosen: dict[str, Any] = {"max_new_tokens": default_max_new_tokens if max_new_tokens is None else max_new_tokens}
    temperature = kwargs.pop("temperature", None) or 0  # None and 0 both mean greedy in lmms-eval's tasks
    sampling = temperature > 0
    if sampling:
        kwargs["temperature"] = temperature
    for key, value in kwargs.items():
        if key in ALWAYS_IGNORED or (key in SAMPLING_ONLY and not sampling):
            continue
        if key in fields:
            chosen[key] = value
        elif key not in GREEDY_VALUES or value not in (None, GREEDY_VALUES[key]):
            raise ValueError(
                f"gen_kwargs {key}={value!r} is not supported: llava_stf's Generator takes {sorted(fields)}; "
                "override the task's value with lmms-eval's --gen_kwargs, e.g. temperature=0"
            )
    if not isinstance(chosen["max_new_tokens"], int) or chosen["max_new_tokens"] < 1:
        raise ValueError(f"gen_kwargs max_new_tokens must be a positive integer, got {chosen['max_new_tokens']!r}")
    return GenerationSettings(**chosen), tuple(s for s in until if s)


def cut_at_stop(answer: str, stops: Iterable[str]) -> str:
    """``answer`` up to the earliest of the ``stops`` strings it contains, stripped (unchanged without a match)."""
    cut = min((i for i in (answer.find(s) for s in stops if s) if i >= 0), default=len(answer))
    return answer[:cut].strip()


def plan_batches(keys: Sequence[Hashable], lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches: requests grouped by ``keys`` (first-seen order), longest first, at most ``batch_size`` each."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    batches = []
    for members in groups.values():
        members = sorted(members, key=lambda i: -lengths[i])  # stable: equal lengths keep request order
        batches += [members[s : s + batch_size] for s in range(0, len(members), batch_size)]
    return batches


def _parse_batch_size(batch_size: int | str) -> int:
    try:
        return int(batch_size)
    except (TypeError, ValueError):
        raise ValueError(
            f"batch_size must be an integer for llava_stf ('auto' is not supported), got {batch_size!r}"
        ) from None


class LlavaStfLmms(lmms):
    """lmms-eval model ``llava_stf`` over a ``llava_stf`` checkpoint folder.

    Args:
        pretrained: A local checkpoint folder (``save_pretrained`` output, or ``python -m llava_stf.convert``'s).
        device: ``cuda``, ``cuda:1``, ``cpu``...; default ``cuda:$LOCAL_RANK`` when CUDA is available, else ``cpu``.
        dtype: ``float16`` | ``bfloat16`` | ``float32``; default float16 on a GPU and float32 on a CPU.
        batch_size: Requests per ``generate`` call (answers do not depend on it: left padding).
        max_new_tokens: Used when a task's ``generation_kwargs`` set none.
        max_batch_size: Accepted because lmms-eval passes it; unused (no ``auto`` batch size).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        max_batch_size: int | None = None,
    ) -> None:
        if _LMMS_IMPORT_ERROR is not None:
            raise ImportError(LMMS_EVAL_INSTALL_HINT) from _LMMS_IMPORT_ERROR
        super().__init__()
        if not Path(pretrained).is_dir():
            raise FileNotFoundError(
                f"pretrained must be a local llava_stf checkpoint folder, got {pretrained!r}; convert released weights "
                "first with python -m llava_stf.convert"
            )
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {sorted(DTYPES)}")
        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self.batch_size = _parse_batch_size(batch_size)
        plan_batches([], [], self.batch_size)  # validates batch_size before the model loads
        self.max_new_tokens = int(max_new_tokens)
        self.generator = Generator.from_pretrained(pretrained, device, DTYPES[dtype] if dtype else None)
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Answers to lmms-eval ``Instance``s whose ``args`` are ``(context, gen_kwargs, doc_to_visual, doc_id,
        task, split)``, in request order."""
        args = [instance.args for instance in requests]
        plans = [self._settings(a) for a in args]  # every request's settings are checked before generating
        lengths = [len(a[0]) if isinstance(a[0], str) else 0 for a in args]
        answers: list[str | None] = [None] * len(args)
        progress = tqdm(total=len(args), disable=self.rank != 0, desc="llava_stf answering")
        for batch in plan_batches([p[0] for p in plans], lengths, self.batch_size):
            batch_requests = [self._request(args[i]) for i in batch]
            texts = self.generator.generate(batch_requests, plans[batch[0]][0])
            for i, text in zip(batch, texts):
                answers[i] = cut_at_stop(text, plans[i][1])
                self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), answers[i])
            progress.update(len(batch))
        progress.close()
        return answers  # type: ignore[return-value]

    def _settings(self, args: tuple) -> tuple[GenerationSettings, tuple[str, ...]]:
        try:
            return generation_settings(args[1], self.max_new_tokens)
        except ValueError as error:
            raise ValueError(f"task {args[4]!r}: {error}") from error

    def _request(self, args: tuple) -> Request:
        """``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` -> a ``Request`` with the doc's image."""
        context, _, doc_to_visual, doc_id, task, split = args
        where = f"task {task!r}, split {split!r}, doc {doc_id!r}"
        try:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        except Exception as error:  # a missing or corrupt image: name the doc, keep the cause
            raise RuntimeError(f"{where}: doc_to_visual failed: {type(error).__name__}: {error}") from error
        try:
            return build_request(context, visuals)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: {error}") from error

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "llava_stf runs generation tasks only (output_type generate_until); loglikelihood / multiple_choice tasks "
            "are not supported"
        )

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("llava_stf does not support multi-round tasks (generate_until_multi_round)")


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "LlavaStfLmms",
    "build_request",
    "cut_at_stop",
    "flatten_visuals",
    "generation_settings",
    "plan_batches",
]
