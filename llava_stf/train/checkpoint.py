"""Hand-offs: complete Trainer checkpoints, the stage-1 projector file, its strict loading, merging a LoRA state dict.

A ``checkpoint-N`` folder counts only once ``CompleteCheckpoints`` (a ``TrainerCallback``) has written
``checkpoint_complete.json`` into it: in ``on_save``, which the Trainer calls after it has written every file of the
checkpoint, and after a barrier, so every process's files (ZeRO shards) are in. A process killed while the Trainer
writes leaves a folder without it, which ``--resume`` skips (``list_checkpoints``). The callback also keeps
``save_total_limit``: it counts complete checkpoints only (and removes incomplete ones older than the newest complete
one), and ``remove_checkpoint`` deletes the marker before the rest of the folder, so a kill during a removal never
leaves a marked, half-deleted folder. The Trainer's own rotation, turned off by ``LlavaStfTrainer``, does neither: it
may delete the only complete checkpoint before the new one is marked.

The stage-1 output is ``projector.safetensors`` (keys of ``model.model.multi_modal_projector``, metadata
``projector_type``; an AnyRes model adds its ``image_newline`` ``[D]`` under that key) next to the model's
``config.json`` and the processor. Stage 2 loads it with ``load_projector``, which also takes a file made by
``python -m llava_stf.convert --projector-only`` or an original LLaVA / LLaVA-STF ``mm_projector.bin`` (converted on
the fly). A different projector setting, a missing or extra key or a shape mismatch is an error that names them; the
one exception is a file without ``image_newline`` (a LLaVA-1.5 projector) loaded into an AnyRes model, whose
``image_newline`` then keeps its fresh initialisation, as LLaVA-NeXT's starts, and the log says so. Under ZeRO-3 the
parameters are gathered for the load (LLaVA's ``torch.Size([0])`` failure in ``initialize_vision_modules``,
haotian-liu/LLaVA#736).

A LoRA run's ``adapter/`` is PEFT's (LoRA + the projector as ``modules_to_save``); PEFT saves modules only, so an
AnyRes model's trained ``image_newline`` goes beside it in ``adapter/connector.safetensors``
(``save_adapter_extras``); ``load_adapter`` puts both back on a base model.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llava_stf.model.conversion import ConversionError, convert_projector_state_dict

from .stages import NEWLINE_ATTR, PROJECTOR_ATTR, connector_extras

logger = logging.getLogger(__name__)

PROJECTOR_FILE = "projector.safetensors"
ADAPTER_EXTRAS_FILE = "connector.safetensors"  # in a LoRA adapter folder: connector parameters PEFT does not save
LLAVA_PROJECTOR_FILE = "mm_projector.bin"
# config.json fields that must agree between the stage-1 run and the model that loads its projector
MATCHED_FIELDS = ("projector_type", "projector_kwargs", "vision_feature_layer", "vision_feature_select_strategy")
COMPLETE_MARKER = "checkpoint_complete.json"  # written last into a checkpoint-N folder
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """One ``checkpoint-N`` folder of a run."""

    step: int
    path: Path
    complete: bool  # holds COMPLETE_MARKER: every file was written before the run went on


def list_checkpoints(output_dir: str | Path) -> list[Checkpoint]:
    """The ``checkpoint-N`` folders of ``output_dir``, oldest first (``[]`` when it does not exist)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir():
            found.append(Checkpoint(int(match.group(1)), path, (path / COMPLETE_MARKER).is_file()))
    return sorted(found, key=lambda c: c.step)


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint (or any) folder, its marker first: a kill half-way never leaves a marked, partial one."""
    path = Path(path)
    (path / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(path)


class CompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once the Trainer has written it, then keeps the newest ``keep`` complete ones.

    Args:
        keep: ``save_total_limit`` (``None``: keep all). Incomplete checkpoints older than the newest complete one
            are removed too; the best checkpoint (``load_best_model_at_end``) is kept.
    """

    def __init__(self, keep: int | None = None):
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's part of the checkpoint (ZeRO shards) is written
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        (folder / COMPLETE_MARKER).write_text(json.dumps({"global_step": state.global_step}) + "\n")
        if self.keep is None:
            return
        checkpoints = list_checkpoints(args.output_dir)
        complete = [c for c in checkpoints if c.complete]
        kept = {c.path for c in complete[-max(self.keep, 1) :]} | {folder}
        if state.best_model_checkpoint:
            kept.add(Path(state.best_model_checkpoint))
        for old in checkpoints:
            if old.path not in kept and old.step < state.global_step:
                logger.info("save_total_limit=%d: removing %s", self.keep, old.path)
                remove_checkpoint(old.path)


@contextmanager
def gathered(params: Iterable[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Gather ZeRO-3 partitioned parameters for the duration of the block (a no-op without ZeRO-3)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def save_projector(
    projector: nn.Module,
    path: str | Path,
    projector_type: str,
    write: bool = True,
    image_newline: nn.Parameter | None = None,
) -> Path:
    """Write the projector's weights alone to ``path`` (every rank must call this under ZeRO-3; ``write`` on one).

    Args:
        projector: ``model.model.multi_modal_projector``.
        path: the ``.safetensors`` file to write.
        projector_type: recorded in the file's metadata.
        write: whether this rank writes.
        image_newline: an AnyRes model's ``[D]`` row-end embedding, saved under the key ``image_newline``.
    """
    path = Path(path)
    extras = [] if image_newline is None else [image_newline]
    with gathered([*projector.parameters(), *extras]):
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in projector.state_dict().items()}
        if image_newline is not None:
            state[NEWLINE_ATTR] = image_newline.detach().to("cpu").contiguous().clone()
    if write:
        save_file(state, path, metadata={"format": "pt", "projector_type": projector_type})
    return path


def _check_config(source: Path, config) -> None:
    saved = json.loads(source.read_text())
    ours = config.to_dict()
    diff = {k: (saved.get(k), ours.get(k)) for k in MATCHED_FIELDS if k in saved and saved.get(k) != ours.get(k)}
    for tower in ("vision_config", "text_config"):
        if saved.get(tower, {}).get("hidden_size") != ours[tower]["hidden_size"]:
            diff[f"{tower}.hidden_size"] = (saved.get(tower, {}).get("hidden_size"), ours[tower]["hidden_size"])
    if diff:
        rows = "; ".join(f"{k}: file {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"the projector in {str(source.parent)!r} was trained for another model: {rows}")


def read_projector_file(path: str | Path, config, source: str | None = None) -> dict[str, torch.Tensor]:
    """The projector state dict in ``path`` (a stage-1 folder, a ``.safetensors`` file or a LLaVA ``.bin``).

    Args:
        path: stage-1 output folder, projector safetensors file, or ``mm_projector.bin`` (file or its folder).
        config: the ``LlavaStfConfig`` of the model that will load it (checked against the saved settings).
        source: for a ``.bin``: ``llava`` or ``llava-stf-official``; ``None`` guesses from the keys.
    """
    path = Path(path)
    if path.is_dir():
        for name in (PROJECTOR_FILE, LLAVA_PROJECTOR_FILE):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"no {PROJECTOR_FILE} or {LLAVA_PROJECTOR_FILE} in {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"projector file {str(path)!r} does not exist")
    if (path.parent / "config.json").is_file():
        _check_config(path.parent / "config.json", config)
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            saved_type = (f.metadata() or {}).get("projector_type")
        if saved_type is not None and saved_type != config.projector_type:
            raise ValueError(
                f"{str(path)!r} holds a {saved_type!r} projector but the model's projector_type is "
                f"{config.projector_type!r}"
            )
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if source is None:
        source = "llava-stf-official" if any("mm_projector_crosslayer" in k for k in state) else "llava"
    return convert_projector_state_dict(source, state)


def load_projector(model: nn.Module, path: str | Path, source: str | None = None) -> None:
    """Load a stage-1 projector into ``model.model.multi_modal_projector`` (strict; works under ZeRO-3).

    Raises:
        ValueError: settings, keys or shapes that do not match, all named.
    """
    projector = getattr(model.model, PROJECTOR_ATTR)
    state = read_projector_file(path, model.config, source)
    newline = next(iter(connector_extras(model)), None)  # AnyRes: image_newline
    newline_state = state.pop(NEWLINE_ATTR, None) if newline is not None else None
    if newline is not None and newline_state is None:
        logger.info("%s holds no %s (a LLaVA-1.5 projector): the AnyRes model keeps a fresh one", path, NEWLINE_ATTR)
    with gathered([*projector.parameters(), *([newline] if newline is not None else [])], modifier_rank=0):
        if newline_state is not None and tuple(newline_state.shape) != tuple(newline.shape):
            raise ConversionError(
                f"projector file {str(path)!r}: {NEWLINE_ATTR} has shape {tuple(newline_state.shape)}, the model's "
                f"{tuple(newline.shape)}"
            )
        expected = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        common = sorted(set(state) & set(expected))
        shapes = [f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}" for k in common
                  if tuple(state[k].shape) != expected[k]]  # fmt: skip
        if missing or unexpected or shapes:
            raise ConversionError(
                f"projector file {str(path)!r} does not fit projector_type {model.config.projector_type!r}: "
                f"missing keys {missing}, unexpected keys {unexpected}, shape mismatches {shapes}"
            )
        projector.load_state_dict(state, strict=True)
        if newline_state is not None:
            with torch.no_grad():
                newline.copy_(newline_state.to(newline.dtype))
    extra = f" and {NEWLINE_ATTR}" if newline_state is not None else ""
    logger.info("loaded the %d projector tensors%s from %s", len(state), extra, path)


def save_adapter_extras(model: nn.Module, folder: str | Path, write: bool = True) -> Path | None:
    """Write the connector parameters PEFT's adapter lacks (AnyRes: ``image_newline``) into ``folder``.

    Every rank must call this under ZeRO-3; ``write`` on one. Returns the file, or ``None`` when there is none
    (a LLaVA-1.5 model: the adapter holds its whole connector).
    """
    extras = connector_extras(model)
    if not extras:
        return None
    path = Path(folder) / ADAPTER_EXTRAS_FILE
    with gathered(extras):
        state = {NEWLINE_ATTR: extras[0].detach().to("cpu").contiguous().clone()}
    if write:
        save_file(state, path, metadata={"format": "pt"})
    return path


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """A LoRA run's ``adapter/`` on ``model`` (a fresh or stage-1 base): the PEFT model, ``image_newline`` loaded.

    Raises:
        ValueError: an AnyRes model and an adapter folder without ``connector.safetensors``, or the reverse.
    """
    from peft import PeftModel

    folder = Path(folder)
    extras, file = connector_extras(model), folder / ADAPTER_EXTRAS_FILE
    if extras and not file.is_file():
        raise ValueError(f"{str(folder)!r} lacks {ADAPTER_EXTRAS_FILE}: the AnyRes model's trained {NEWLINE_ATTR}")
    if file.is_file() and not extras:
        raise ValueError(f"{str(folder)!r} is an AnyRes adapter ({ADAPTER_EXTRAS_FILE}) but the model is not AnyRes")
    with warnings.catch_warnings():  # peft 0.21 reads transformers 5.24's deprecated alias (as in stages.wrap_lora)
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(model, str(folder))
    if extras:
        state = load_file(str(file))
        with torch.no_grad():
            extras[0].copy_(state[NEWLINE_ATTR].to(extras[0].dtype))
    return peft_model


def merge_lora_state_dict(state: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """PEFT LoRA model state dict -> the plain model's state dict with ``W + scaling * B @ A`` folded in.

    Handles PEFT's layout: a ``base_model.model.`` prefix, ``<layer>.base_layer.weight`` with
    ``<layer>.lora_A.default.weight`` / ``lora_B``, and ``modules_to_save`` copies (the trained one is kept, the
    ``original_module`` dropped). Any other LoRA key is an error rather than a silently unmerged adapter.
    """
    prefix = "base_model.model."
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if ".lora_A." in name or ".lora_B." in name or ".original_module." in name:
            continue
        if "lora_" in name:
            raise ValueError(f"cannot merge LoRA key {key!r} (only plain LoRA on Linear layers is supported)")
        if ".base_layer." in name:
            layer = name.split(".base_layer.")[0]
            name = name.replace(".base_layer.", ".")
            a = state.get(f"{prefix}{layer}.lora_A.default.weight")
            b = state.get(f"{prefix}{layer}.lora_B.default.weight")
            if name.endswith(".weight") and a is not None and b is not None:
                value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
        name = name.replace(".modules_to_save.default.", ".")
        out[name] = value
    return out


__all__ = [
    "ADAPTER_EXTRAS_FILE",
    "COMPLETE_MARKER",
    "LLAVA_PROJECTOR_FILE",
    "PROJECTOR_FILE",
    "Checkpoint",
    "CompleteCheckpoints",
    "gathered",
    "list_checkpoints",
    "load_adapter",
    "load_projector",
    "merge_lora_state_dict",
    "read_projector_file",
    "remove_checkpoint",
    "save_adapter_extras",
    "save_projector",
]
