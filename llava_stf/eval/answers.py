"""Answer files: append-only part files per shard, resume bookkeeping and the deterministic merge.

Each shard appends its answers to its own part file, ``<answers>.parts/{chunks}_{idx}.jsonl`` beside the final
answers file: one JSON line per question, each batch written whole with one ``write`` and flushed to the operating
system (all a killed process needs; ``fsync`` runs at most once a second and on close, so even a machine crash loses
at most the last second). A record carries the upstream fields (``question_id``, ``prompt``, ``text``,
``answer_id``, ``model_id``, ``metadata`` and any benchmark extras) plus ``key``, the sample's unique key. A run
killed mid-write leaves at most one incomplete last line, which the owner cuts off when it restarts and readers
ignore. Resuming reads **all** part files, so a restart with a different number of chunks still skips every
question answered before. The merge writes the final file (upstream fields only, no ``key``) in question-file order
once every question has an answer, atomically.

What produced the answers is recorded beside them, in ``<answers>.provenance.json`` (``provenance_file``): the
checkpoint digest, the question-file digest and the generation settings (``llava_stf.provenance.Provenance``). It is
written before the first part file, so part files and the merged file always have one; the answers files themselves
keep upstream's layout.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from ..errors import UserError
from ..provenance import Provenance

logger = logging.getLogger(__name__)

KEY = "key"


def parts_dir(answers_file: Path) -> Path:
    """Folder of the part files of ``answers_file`` (``merge.jsonl`` -> ``merge.jsonl.parts/``)."""
    return answers_file.with_name(answers_file.name + ".parts")


def provenance_file(answers_file: Path) -> Path:
    """The record of what produced ``answers_file`` (``merge.jsonl`` -> ``merge.jsonl.provenance.json``)."""
    return answers_file.with_name(answers_file.name + ".provenance.json")


def read_provenance(answers_file: Path) -> Provenance | None:
    """The provenance recorded for ``answers_file``; None when there is no record.

    Raises:
        ValueError: If the record is not readable (naming the file).
    """
    path = provenance_file(answers_file)
    if not path.is_file():
        return None
    try:
        return Provenance.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: unreadable provenance record ({err}); move it away or pass --overwrite") from None


def write_provenance(answers_file: Path, provenance: Provenance) -> None:
    """Record what produces ``answers_file`` (temporary file + rename)."""
    write_text_atomic(provenance_file(answers_file), json.dumps(provenance.to_json(), indent=1) + "\n")


def has_answers(answers_file: Path) -> bool:
    """Whether ``answers_file`` or any of its part files exists."""
    folder = parts_dir(answers_file)
    return answers_file.is_file() or (folder.is_dir() and any(folder.glob("*.jsonl")))


def read_jsonl(path: Path, complete_lines_only: bool = False) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file.

    Args:
        path: The file.
        complete_lines_only: Ignore a last line without its newline (another process may be writing it); and skip,
            with a warning, lines that do not parse.

    Raises:
        ValueError: If a line does not parse and ``complete_lines_only`` is False (naming file and line).
    """
    data = path.read_bytes()
    lines = data.split(b"\n")
    if complete_lines_only:
        lines = lines[:-1]  # the text after the last newline: empty, or a line still being written
    records, bad = [], 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if not complete_lines_only:
                raise ValueError(f"{path}:{number}: not a JSON line ({err})") from None
            bad += 1
    if bad:
        logger.warning("%s: skipped %d unreadable line(s)", path, bad)
    return records


def write_jsonl_atomic(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Write JSON lines to ``path`` through a temporary file and a rename, so readers never see half a file."""
    write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def write_text_atomic(path: Path, text: str | bytes) -> None:
    """Write ``path`` through a temporary file in its folder, ``fsync`` and a rename: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(text.encode("utf-8") if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def answered(answers_file: Path, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{key: record}`` of every question of ``keys`` answered in any part file (first record per key wins)."""
    wanted, found, stale, duplicates = set(keys), {}, 0, 0
    folder = parts_dir(answers_file)
    for part in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        for record in read_jsonl(part, complete_lines_only=True):
            key = record.get(KEY)
            if key not in wanted:
                stale += 1
            elif key in found:
                duplicates += 1
            else:
                found[key] = record
    if stale:
        logger.warning("%s: ignored %d answer(s) for questions not in the question file", folder, stale)
    if duplicates:
        logger.warning("%s: %d question(s) answered twice; the first answer is kept", folder, duplicates)
    return found


class PartWriter:
    """The append-only part file of one shard, locked against a second process running the same shard.

    Opening it cuts off an incomplete last line left by a killed run.
    """

    def __init__(self, answers_file: Path, chunks: int, index: int, sync_every_s: float = 1.0):
        self.sync_every_s, self._synced = sync_every_s, time.monotonic()
        self.path = parts_dir(answers_file) / f"{chunks}_{index}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] = self.path.open("a+b")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise UserError(f"another process is writing {self.path} (is the same chunk running twice?)") from None
        self._repair()

    def _repair(self) -> None:
        self._file.seek(0)
        data = self._file.read()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            self._file.truncate(keep)
            dropped = len(data) - keep
            logger.warning("%s: dropped an incomplete last line (%d bytes) of an interrupted run", self.path, dropped)

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Append records (each with ``key``) in one write, flushed to the OS (``fsync`` at most once a second)."""
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        self._file.seek(0, os.SEEK_END)
        self._file.write(payload)
        self._file.flush()
        if time.monotonic() - self._synced >= self.sync_every_s:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            os.fsync(self._file.fileno())
            self._file.close()  # also releases the lock

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge(answers_file: Path, keys: Sequence[str]) -> list[dict[str, Any]] | None:
    """Write the final answers file in question order once every key is answered; None while some are missing.

    Args:
        answers_file: The final file (the upstream name, e.g. ``pope/answers/<ckpt>.jsonl``).
        keys: Every sample key, in question-file order.

    Returns:
        The merged records (without ``key``), or None if some question has no answer yet.
    """
    found = answered(answers_file, keys)
    if len(found) < len(keys):
        return None
    records = [{k: v for k, v in found[key].items() if k != KEY} for key in keys]
    write_jsonl_atomic(answers_file, records)
    return records


__all__ = [
    "KEY",
    "PartWriter",
    "answered",
    "has_answers",
    "merge",
    "parts_dir",
    "provenance_file",
    "read_jsonl",
    "read_provenance",
    "write_jsonl_atomic",
    "write_provenance",
    "write_text_atomic",
]
