"""``keep_freed_memory``: ask glibc's allocator to keep freed memory in the process (the CPU miniature's runs).

Every training step of the miniature allocates and frees the same activation and gradient buffers. glibc's default
hands large freed blocks back to the operating system (blocks above a dynamic mmap threshold, and the heap's top
above 128 KiB), and the next step faults them in again: measured on the 2-core machine, the default demo spent about
45 s of system time on that (of 5 min 16 s; 4 s with this setting, with identical losses). PyTorch's CPU
performance tuning guide (pytorch.org, "Performance Tuning Guide", "Switch Memory allocator") recommends a caching
allocator (jemalloc, TCMalloc) for the same reason; ``mallopt`` gets the same effect without a preloaded library.
The process then keeps its peak memory until it exits, which is what a training run does anyway.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: blocks up to 32 MiB come from the heap (fixed: no dynamic raise)
TRIM_THRESHOLD = 2**30  # keep up to 1 GiB of free heap top


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (above); ``False`` (nothing changed) off glibc, or when the user set
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (their choice wins)."""
    if not sys.platform.startswith("linux") or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_",
                                                                          "MALLOC_TRIM_THRESHOLD_")):  # fmt: skip
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: their own allocator, left alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    logger.debug("glibc mallopt: %s", "set" if done else "refused")
    return done


__all__ = ["keep_freed_memory"]
