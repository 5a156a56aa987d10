"""The stage table: what trains, what is frozen, which template and image mode, and what is saved.

| stage | trainable | frozen | template | images | saved |
|---|---|---|---|---|---|
| ``pretrain`` | projector | vision tower, LLM | ``plain`` | ``square`` | projector weights, config, processor |
| ``finetune`` | projector, LLM (embeddings, LM head) | vision tower | ``vicuna_v1`` | ``pad`` | full model |
| ``lora`` | LoRA on LLM ``Linear``s, projector | vision tower, base LLM | ``vicuna_v1`` | ``pad`` | adapter, merged |

The vision tower is always frozen; with no parameter needing a gradient and an input that needs none, autograd
records nothing there, which is LLaVA's ``no_grad`` tower. ``apply_stage`` is the one place that sets
``requires_grad``; it logs the frozen and trainable parameter counts per part.

AnyRes (LLaVA-NeXT) models: the "projector" part is the whole connector between the tower and the LLM, the
projector *and* ``image_newline`` (the learned token closing each row of tiles, ``model.model.image_newline``), so
stage 1 trains and saves both, stage 2 starts from both, and LoRA keeps both trainable beside the adapter. Their
images are always ``anyres`` (the processor's mode); the table's image column is LLaVA-1.5's.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

logger = logging.getLogger(__name__)

PARTS = ("vision_tower", "projector", "language_model", "lora")
PROJECTOR_ATTR = "multi_modal_projector"  # attribute name of the projector (a contract of the model package)
NEWLINE_ATTR = "image_newline"  # AnyRes: the row-end embedding [D] beside the projector (transformers' LlavaNextModel)


@dataclass(frozen=True)
class Stage:
    """One row of the stage table."""

    name: str
    trains: tuple[str, ...]  # parts trained in full: "projector", "language_model"
    lora: bool  # LoRA adapters on the language model's Linear layers (the base stays frozen)
    template: str  # conversation template (saved with the processor)
    image_aspect_ratio: str  # image mode (saved with the processor)
    saves: str  # "projector" (weights alone), "model" (full model), "lora" (adapter + merged model)


STAGES: Mapping[str, Stage] = MappingProxyType(
    {
        "pretrain": Stage("pretrain", ("projector",), False, "plain", "square", "projector"),
        "finetune": Stage("finetune", ("projector", "language_model"), False, "vicuna_v1", "pad", "model"),
        "lora": Stage("lora", ("projector",), True, "vicuna_v1", "pad", "lora"),
    }
)


def get_stage(name: str) -> Stage:
    """Look up a stage; an unknown name lists the valid ones."""
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; valid stages: {sorted(STAGES)}") from None


def part_of(name: str) -> str:
    """Which part a parameter belongs to, from its name (plain or PEFT-wrapped model).

    ``image_newline`` (AnyRes) is connector state, so it counts as "projector".
    """
    if "lora_" in name:
        return "lora"
    if f".{PROJECTOR_ATTR}." in f".{name}" or name.split(".")[-1] == NEWLINE_ATTR:
        return "projector"
    if ".vision_tower." in f".{name}":
        return "vision_tower"
    return "language_model"


def numel(param: nn.Parameter) -> int:
    """Element count, also for a ZeRO-3 partitioned parameter (whose local tensor is empty)."""
    return int(getattr(param, "ds_numel", param.numel()))


def parameter_counts(model: nn.Module) -> dict[str, Counter]:
    """``{"trainable": Counter(part -> n), "frozen": Counter(part -> n)}``."""
    counts = {"trainable": Counter(), "frozen": Counter()}
    for name, param in model.named_parameters():
        counts["trainable" if param.requires_grad else "frozen"][part_of(name)] += numel(param)
    return counts


def log_parameter_counts(model: nn.Module, stage: Stage) -> dict[str, Counter]:
    """Log frozen and trainable counts per part ("frozen: vision_tower 303.5M, ...; trainable: projector 172.0M")."""
    counts = parameter_counts(model)

    def fmt(c: Counter) -> str:
        return ", ".join(f"{part} {n / 1e6:.3f}M" for part, n in sorted(c.items())) or "nothing"

    logger.info("stage %s: trainable: %s; frozen: %s", stage.name, fmt(counts["trainable"]), fmt(counts["frozen"]))
    return counts


def apply_stage(model: nn.Module, stage: Stage) -> dict[str, Counter]:
    """Set ``requires_grad`` for ``stage`` on a ``LlavaStfForConditionalGeneration`` (before any LoRA wrap).

    Returns:
        The logged parameter counts.
    """
    model.requires_grad_(False)
    modules = {
        "projector": [getattr(model.model, PROJECTOR_ATTR), *connector_extras(model)],
        "language_model": [model.model.language_model, model.lm_head],
    }
    for part in stage.trains:
        for module in modules[part]:
            module.requires_grad_(True)
    return log_parameter_counts(model, stage)


def connector_extras(model: nn.Module) -> list[nn.Parameter]:
    """Connector parameters outside the projector: ``[image_newline]`` for an AnyRes model, ``[]`` otherwise."""
    newline = getattr(model.model, NEWLINE_ATTR, None)
    return [newline] if isinstance(newline, nn.Parameter) else []


def lora_target_modules(model: nn.Module) -> list[str]:
    """Full names of every ``nn.Linear`` in the language model (LLaVA: all LLM linears; ``lm_head`` excluded)."""
    prefix = "model.language_model."
    return [prefix + n for n, m in model.model.language_model.named_modules() if isinstance(m, nn.Linear)]


def wrap_lora(model: nn.Module, stage: Stage, r: int, alpha: int, dropout: float) -> nn.Module:
    """Add LoRA adapters to the LLM's linear layers and keep a trainable copy of the projector (PEFT).

    The projector is a PEFT ``modules_to_save`` entry, so the saved adapter holds the trained projector too.
    ``image_newline`` (AnyRes) is a bare parameter, which ``modules_to_save`` cannot name (it wraps modules): it
    stays trainable here and is saved beside the adapter (``checkpoint.save_adapter_extras``).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias="none",
        target_modules=lora_target_modules(model),
        modules_to_save=[PROJECTOR_ATTR],
    )
    with warnings.catch_warnings():  # peft 0.21 reads transformers 5.24's deprecated alias; nothing of ours to change
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    for param in connector_extras(model):  # PEFT froze everything but the adapter and modules_to_save
        param.requires_grad_(True)
    log_parameter_counts(peft_model, stage)
    return peft_model


__all__ = [
    "NEWLINE_ATTR",
    "PARTS",
    "PROJECTOR_ATTR",
    "STAGES",
    "Stage",
    "apply_stage",
    "connector_extras",
    "get_stage",
    "log_parameter_counts",
    "lora_target_modules",
    "parameter_counts",
    "part_of",
    "wrap_lora",
]
