"""``ImageCache``: a bounded in-memory memo of preprocessed images, for runs that read the same images many times.

LLaVA's image preprocessing is deterministic (resize/pad/crop and normalise, no augmentation), so a run of several
epochs over a small set (the miniature's 15 epochs over 1,000 images) can keep each image's processor output
instead of decoding and resizing its file every time. Entries are keyed by the file's path, size and modification
time: a file changed during the run is read again, never served stale. The memo only grows until ``limit_mb`` is
reached (later images are simply not kept); each DataLoader worker holds its own copy.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def nbytes(value: Any) -> int:
    """Bytes held by the tensors in ``value`` (a tensor, or a dict/list/tuple of them; other values count 0)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


class BoundedMemo:
    """Key -> value (anything holding tensors), at most ``limit_mb`` MiB of tensors; it stops growing at the bound.

    Args:
        limit_mb: memory bound in MiB; 0 keeps nothing.
        what: the memo's name in the log line said once when it is full.
    """

    def __init__(self, limit_mb: float, what: str):
        self.limit, self.what = int(limit_mb * 2**20), what
        self.entries: dict[Any, Any] = {}
        self.used = 0
        self.full = False

    def fits(self, size: int) -> bool:
        """Whether ``size`` more bytes stay within the bound (the first refusal is logged)."""
        if self.used + size <= self.limit:
            return True
        if not self.full:
            logger.info("%s full (%.0f MiB, %d entries): later ones are not kept", self.what, self.used / 2**20,
                        len(self.entries))  # fmt: skip
            self.full = True
        return False

    def put(self, key: Any, value: Any) -> None:
        """Keep ``value`` for ``key`` unless it is there already or the bound does not allow it."""
        if key is None or key in self.entries:
            return
        size = nbytes(value)
        if self.fits(size):
            self.entries[key] = value
            self.used += size


class ImageCache(BoundedMemo):
    """Path -> processed image, keyed by the file as it is now (path, size, modification time).

    Args:
        limit_mb: memory bound in MiB; 0 turns the cache off (``get`` always misses, ``put`` keeps nothing).
    """

    def __init__(self, limit_mb: float):
        if limit_mb < 0:
            raise ValueError(f"image_cache_mb must be >= 0, got {limit_mb}")
        super().__init__(limit_mb, "image cache")
        self.hits = self.misses = 0

    @staticmethod
    def key(path: Path) -> tuple[str, int, int] | None:
        """(path, size, mtime in ns), or ``None`` when the file cannot be read (the loader reports why)."""
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return str(path), stat.st_size, stat.st_mtime_ns

    def get(self, path: Path) -> tuple[tuple[str, int, int] | None, Any]:
        """(key, the value stored for the file as it is now, or ``None``)."""
        key = self.key(path) if self.limit else None
        value = self.entries.get(key) if key is not None else None
        if key is not None:
            self.hits += value is not None
            self.misses += value is None
        return key, value


__all__ = ["BoundedMemo", "ImageCache", "nbytes"]
