"""``TowerFeatureCache``: memoize the frozen vision tower's outputs per image during training (trainer side).

Every stage keeps the vision tower frozen (``stages``), and a CLIP tower without dropout is deterministic, so an
image seen again in a later epoch gives the same hidden states. On a run of many epochs over few images (the
miniature: 15 + 10 epochs over 1,000 scenes) the tower's forward pass is a large share of each step; this cache
computes it once per image. The model is not changed: the cache replaces the tower *instance's* ``forward`` (the
way accelerate's ``hooks.add_hook_to_module`` wraps a module), so parameter names, saving and loading are as
without it, and ``remove`` restores the original.

An image is keyed by a digest of its ``pixel_values`` bytes (plus the call's other arguments, e.g. which hidden
states are asked for; a call with another tensor argument is not cached), so two files
with the same pixels share an entry and nothing depends on paths. A batch is answered from the cache only when
every image in it is cached; otherwise the tower runs on the whole batch and the new images are stored, until
``limit_mb`` MiB of outputs are held, per process (under DeepSpeed ZeRO-3, where gathering the tower's parameters is
a collective that every process must join, it is refused). Every tensor field of the tower's output (hidden states
of every layer, attentions when asked for) is stored per image, on the device it came from.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled

from llava_stf.data.image_cache import BoundedMemo, nbytes

logger = logging.getLogger(__name__)
# Keyword arguments transformers passes down to every submodule that do not change a tower's features: the loss
# normaliser of the training step (``Trainer.compute_loss`` -> ``LlavaModel.forward`` -> ``get_image_features``).
NOT_FEATURES = frozenset({"num_items_in_batch"})


def dropout_rates(tower: nn.Module) -> dict[str, float]:
    """Non-zero dropout probabilities of ``tower``: ``nn.Dropout`` modules and the configs' ``*dropout*`` fields."""
    rates = {name: float(m.p) for name, m in tower.named_modules() if isinstance(m, nn.Dropout) and m.p > 0}
    config = getattr(tower, "config", None)
    for key, value in (config.to_dict() if config is not None else {}).items():
        if "dropout" in key and isinstance(value, (int, float)) and value > 0:
            rates[f"config.{key}"] = float(value)
    return rates


def check_cacheable(tower: nn.Module) -> None:
    """Raise ``ValueError`` unless ``tower`` is frozen and deterministic (no trainable parameter, no dropout)."""
    trainable = [name for name, p in tower.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"vision_feature_cache_mb needs a frozen vision tower; trainable: {trainable[:3]}")
    rates = dropout_rates(tower)
    if rates:
        raise ValueError(f"vision_feature_cache_mb needs a deterministic vision tower; it has dropout {rates}")


class TowerFeatureCache:
    """Per-image memo of ``tower``'s outputs (see the module docstring).

    Args:
        tower: the frozen vision tower (``model.model.vision_tower``); checked by ``check_cacheable``.
        limit_mb: memory bound in MiB for the stored outputs (> 0).
    """

    def __init__(self, tower: nn.Module, limit_mb: float):
        if limit_mb <= 0:
            raise ValueError(f"vision_feature_cache_mb must be > 0 to cache, got {limit_mb}")
        check_cacheable(tower)
        self.tower = tower
        self.memo = BoundedMemo(limit_mb, "vision feature cache")  # key -> (output class, fields)
        self.hits = self.misses = 0
        self.original = tower.forward

    def install(self) -> TowerFeatureCache:
        self.tower.forward = self.forward
        return self

    def remove(self) -> None:
        if self.tower.__dict__.get("forward") == self.forward:
            del self.tower.forward

    @staticmethod
    def image_keys(pixel_values: torch.Tensor) -> list[str]:
        """One digest per image of ``pixel_values`` ``[n_images, ...]`` (dtype and shape included)."""
        cpu = pixel_values.detach().to("cpu").contiguous()
        head = f"{cpu.dtype}{tuple(cpu.shape[1:])}".encode()
        return [hashlib.blake2b(head + image.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
                for image in cpu]  # fmt: skip

    def forward(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The tower's forward with a per-image memo; other tensor arguments bypass the cache."""
        keyed = {k: v for k, v in kwargs.items() if k not in NOT_FEATURES}
        if args or any(isinstance(v, torch.Tensor) for v in keyed.values()) or pixel_values.dim() < 2:
            return self.original(pixel_values, *args, **kwargs)
        call = repr(sorted(keyed.items()))
        keys = [(key, call) for key in self.image_keys(pixel_values)]
        stored = [self.memo.entries.get(key) for key in keys]
        if all(entry is not None for entry in stored):
            self.hits += len(keys)
            return self.assemble(stored)
        self.misses += len(keys)
        outputs = self.original(pixel_values, *args, **kwargs)
        self.store(keys, outputs)
        return outputs

    def store(self, keys: list[tuple[str, str]], outputs: Any) -> None:
        """Keep each image's slice of ``outputs`` while the bound allows (outputs of another form: nothing kept)."""
        fields = {name: value for name, value in outputs.items() if value is not None}
        if not all(self.per_image(v, len(keys)) for v in fields.values()):
            return
        for i, key in enumerate(keys):
            if key in self.memo.entries:
                continue
            entry = {name: (tuple(t if t is None else t[i] for t in v) if isinstance(v, tuple) else v[i])
                     for name, v in fields.items()}  # fmt: skip
            if not self.memo.fits(nbytes(entry)):  # checked on the views, before copying
                return
            # detached: with gradient checkpointing the embeddings' output requires grad (transformers'
            # ``enable_input_require_grads``), and a stored tensor must not hold on to this step's graph
            fields_i = {name: (tuple(t if t is None else t.detach().clone() for t in v) if isinstance(v, tuple)
                               else v.detach().clone()) for name, v in entry.items()}  # fmt: skip
            self.memo.put(key, (type(outputs), fields_i))

    @staticmethod
    def per_image(value: Any, n: int) -> bool:
        """True for a ``[n, ...]`` tensor or a tuple of them and ``None``s (hidden states not asked for): what the
        cache can split by image."""
        if isinstance(value, tuple):
            return all(t is None or (isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n) for t in value)
        return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n

    @staticmethod
    def assemble(stored: list[tuple[type, dict[str, Any]]]) -> Any:
        """The tower output for a batch of cached images (the same output class, fields stacked per image)."""
        output_type, first = stored[0]
        entries = [fields for _, fields in stored]
        fields = {
            name: (
                tuple(None if t is None else torch.stack([e[name][j] for e in entries]) for j, t in enumerate(value))
                if isinstance(value, tuple)
                else torch.stack([e[name] for e in entries])
            )
            for name, value in first.items()
        }
        return output_type(**fields)


def check_cache_settings(image_cache_mb: float, vision_feature_cache_mb: float) -> None:
    """Refuse (``ValueError``) negative cache sizes, and the feature cache under ZeRO-3, before any tower loads."""
    for name, value in (("image_cache_mb", image_cache_mb), ("vision_feature_cache_mb", vision_feature_cache_mb)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (0: no cache), got {value}")
    if vision_feature_cache_mb and is_deepspeed_zero3_enabled():
        raise ValueError(
            "vision_feature_cache_mb does not work under DeepSpeed ZeRO-3: gathering the partitioned tower is a "
            "collective every process must join, and a process answering from its cache would leave the others "
            "waiting; use ZeRO-2 (the stage-1 script's) or no feature cache (--image_cache_mb works with both)"
        )


def install_feature_cache(model: nn.Module, limit_mb: float) -> TowerFeatureCache | None:
    """A ``TowerFeatureCache`` on ``model``'s vision tower (before any PEFT wrapping), or ``None`` for ``limit_mb``
    0 (``check_cache_settings`` has checked the settings)."""
    if not limit_mb:
        return None
    return TowerFeatureCache(model.model.vision_tower, limit_mb).install()


__all__ = ["TowerFeatureCache", "check_cache_settings", "check_cacheable", "dropout_rates", "install_feature_cache"]
