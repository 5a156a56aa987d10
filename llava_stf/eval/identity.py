"""Who a run's answers and results belong to: the checkpoint's digest, its model id, and a reducer chosen with
``--reducer`` (``llava_stf.reducer_choice``).

The model id (answer and results file names) is the checkpoint folder's name plus the first digits of its content
digest (``stage2-1a2b3c4d``), plus ``+<reducer label>`` when ``--reducer`` differs from the checkpoint's own reducer
(``stage2-1a2b3c4d+fastv@64``: budget 64; ``+none``: reducer removed) and ``-first<N>`` for a ``--limit N`` run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..loading import load_config
from ..provenance import checkpoint_digest, short
from ..reducer_choice import ReducerChoice, ResolvedReducer


def model_id_from_path(path: str | Path) -> str:
    """Upstream's name for a checkpoint: its folder name (``<parent>_checkpoint-N`` for Trainer checkpoints)."""
    path = Path(path).resolve()
    return f"{path.parent.name}_{path.name}" if path.name.startswith("checkpoint-") else path.name


def default_model_id(path: str | Path, digest: str) -> str:
    """The folder name plus the first digits of the content digest: ``stage2-1a2b3c4d``."""
    return f"{model_id_from_path(path)}-{short(digest)}"


@dataclass(frozen=True)
class Identity:
    """What a run's answers and results are filed under."""

    path: Path  # the checkpoint folder
    digest: str  # its content digest
    model_id: str  # answer and results file names
    reducer: ResolvedReducer | None  # a reducer chosen with --reducer that differs from the checkpoint's own


def resolve_reducer(path: Path, choice: ReducerChoice | None) -> ResolvedReducer | None:
    """``choice`` checked against the checkpoint at ``path``; ``None`` when it changes nothing."""
    if choice is None:
        return None
    resolved = choice.resolve(load_config(path))
    return resolved if resolved.changed else None


def identity_of(path: Path, model_id: str | None, choice: ReducerChoice | None, limit: int | None = None) -> Identity:
    """The identity of ``path`` run with ``choice``: the model id is ``model_id`` (default: folder name + digest),
    plus ``+<reducer label>`` when the reducer differs from the checkpoint's own and ``-first<N>`` with a limit."""
    digest = checkpoint_digest(path)
    reducer = resolve_reducer(path, choice)
    name = model_id or default_model_id(path, digest)
    name += f"+{reducer.label}" if reducer is not None and model_id is None else ""
    name += f"-first{limit}" if limit else ""
    return Identity(Path(path), digest, name, reducer)


__all__ = ["Identity", "default_model_id", "identity_of", "model_id_from_path", "resolve_reducer"]
