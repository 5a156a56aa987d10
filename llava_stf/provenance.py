"""What produced a file: content digests of a checkpoint and of a question file, plus the generation settings.

A checkpoint is identified by its contents, never by its folder name (every training run's output folder is called
``stage2``): ``checkpoint_digest`` hashes the files that decide what the model answers (the ``CHECKPOINT_FILES``
table: weights, config, processor and tokenizer files), name and bytes, in name order. Training leftovers
(``trainer_state.json``, optimizer states, run markers) do not count. Large files are streamed (about 1 GB/s per
file, weight shards in parallel: seconds for a 7B checkpoint); a file's hash is cached within a process by (path,
size, mtime), so a second look at the same checkpoint costs a ``stat`` per file.

``Provenance`` bundles the things an answers file depends on (checkpoint digest, question-file digest, generation
settings, and the token reducer when one is chosen at load time instead of the checkpoint's own: ``--reducer``) and
``Provenance.differences`` names which of them differ between two records; the evaluation reuses answers only when
none does.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

# Files of a checkpoint folder that decide its answers (shell patterns, matched against file names).
CHECKPOINT_FILES: Mapping[str, tuple[str, ...]] = {
    "weights": ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json"),
    "config": ("config.json", "generation_config.json"),
    "processor": (
        "processor_config.json",
        "preprocessor_config.json",
        "tokenizer*",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template*",
        "vocab*",
        "merges.txt",
        "*.model",
    ),
}
_CHUNK = 8 * 1024 * 1024
SHORT = 8  # hex digits of a digest shown in model ids and messages


def checkpoint_files(folder: Path) -> list[Path]:
    """The files of ``folder`` that ``checkpoint_digest`` hashes, in name order."""
    patterns = [p for group in CHECKPOINT_FILES.values() for p in group]
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns)),
        key=lambda p: p.name,
    )


def checkpoint_digest(folder: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` over the names and contents of the checkpoint's weight, config and processor files.

    Raises:
        FileNotFoundError: If ``folder`` is not a folder.
        ValueError: If it holds none of those files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    files = checkpoint_files(folder)
    if not files:
        raise ValueError(f"{folder} holds no weights, config or processor files to identify a checkpoint by")
    with ThreadPoolExecutor(max_workers=min(4, len(files))) as pool:  # shards in parallel: hashlib frees the GIL
        digests = list(pool.map(file_digest, files))
    total = hashlib.sha256()
    for path, digest in zip(files, digests):
        total.update(f"{path.name}\0{digest}\n".encode())
    return f"sha256:{total.hexdigest()}"


def file_digest(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` of a file's bytes (cached per path, size and modification time within this process)."""
    stat = os.stat(path)
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=1024)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def short(digest: str) -> str:
    """The first ``SHORT`` hex digits of a ``"sha256:<hex>"`` digest."""
    return digest.partition(":")[2][:SHORT]


@dataclass(frozen=True)
class Provenance:
    """What an answers file was produced from. Equal digests and settings mean the same answers."""

    checkpoint: str  # checkpoint_digest of the model
    questions: str  # file_digest of the question file
    generation: Mapping[str, Any]  # decoding settings and dtype (JSON values)
    checkpoint_path: str = ""  # where the checkpoint was (informative only: not compared)
    questions_path: str = ""  # where the question file was (informative only)
    extra: Mapping[str, Any] = field(default_factory=dict)  # further informative fields (model id, adopted, ...)
    reducer: Mapping[str, Any] | None = None  # {"type", "kwargs"} chosen at load time; None: the checkpoint's own

    def to_json(self) -> dict[str, Any]:
        reducer = {} if self.reducer is None else {"reducer": dict(self.reducer)}
        return {
            "checkpoint": {"digest": self.checkpoint, "path": self.checkpoint_path},
            "questions": {"digest": self.questions, "path": self.questions_path},
            "generation": dict(self.generation),
            **reducer,
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Provenance:
        """The record ``to_json`` wrote.

        Raises:
            ValueError: If a field is missing.
        """
        try:
            checkpoint, questions = data["checkpoint"], data["questions"]
            known = ("checkpoint", "questions", "generation", "reducer")
            extra = {k: v for k, v in data.items() if k not in known}
            reducer = data.get("reducer")
            return cls(
                checkpoint["digest"],
                questions["digest"],
                dict(data["generation"]),
                checkpoint.get("path", ""),
                questions.get("path", ""),
                extra,
                dict(reducer) if reducer is not None else None,
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a provenance record (missing {err})") from None

    def differences(self, current: Provenance) -> list[str]:
        """One phrase per differing part (checkpoint, questions, generation settings, reducer), recorded vs
        ``current``."""
        out = []
        if self.checkpoint != current.checkpoint:
            out.append(
                f"checkpoint: recorded {short(self.checkpoint)} ({self.checkpoint_path or '?'}), "
                f"now {short(current.checkpoint)} ({current.checkpoint_path or '?'})"
            )
        if self.questions != current.questions:
            out.append(
                f"questions: recorded {short(self.questions)} ({self.questions_path or '?'}), "
                f"now {short(current.questions)} ({current.questions_path or '?'}): the question file changed"
            )
        if dict(self.generation) != dict(current.generation):
            keys = sorted(set(self.generation) | set(current.generation))
            changed = [
                f"{k} {self.generation.get(k)!r} -> {current.generation.get(k)!r}"
                for k in keys
                if self.generation.get(k) != current.generation.get(k)
            ]
            out.append(f"generation settings: {', '.join(changed)}")
        if _plain(self.reducer) != _plain(current.reducer):
            out.append(f"reducer: recorded {_reducer_text(self.reducer)}, now {_reducer_text(current.reducer)}")
        return out


def _plain(reducer: Mapping[str, Any] | None) -> Any:
    return None if reducer is None else json.loads(json.dumps(reducer, sort_keys=True))


def _reducer_text(reducer: Mapping[str, Any] | None) -> str:
    if reducer is None:
        return "the checkpoint's own"
    if reducer.get("type") is None:
        return "none"
    return f"{reducer['type']} {json.dumps(reducer.get('kwargs') or {}, sort_keys=True)}"


__all__ = ["CHECKPOINT_FILES", "Provenance", "checkpoint_digest", "checkpoint_files", "file_digest", "short"]
