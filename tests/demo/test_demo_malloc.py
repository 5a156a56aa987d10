"""``keep_freed_memory``: glibc keeps freed memory in the process (the demo's steps reuse their buffers)."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from llava_stf.demo.malloc import keep_freed_memory

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
PROBE = """
import ctypes, sys, torch
from llava_stf.demo.malloc import keep_freed_memory
print(keep_freed_memory())
import resource
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    x = torch.empty(4 * 2**20 // 4)  # 4 MiB: above glibc's default mmap threshold
    x.fill_(1.0)
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def probe(*env: str) -> tuple[str, int]:
    import os

    extra = dict(item.split("=", 1) for item in env)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, **extra}).stdout.split()  # fmt: skip
    return out[0], int(out[1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    kept, faults_kept = probe()
    user, faults_default = probe("MALLOC_MMAP_THRESHOLD_=131072")  # the user's own setting wins: nothing changed
    assert (kept, user) == ("True", "False")
    # Without the setting each 4 MiB buffer is mapped and faulted in anew (1,024 pages each); with it, once.
    assert faults_default > 20 * 1024 and faults_kept < 5 * 1024, (faults_kept, faults_default)


def test_off_glibc_nothing_is_changed(monkeypatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert keep_freed_memory() is False
