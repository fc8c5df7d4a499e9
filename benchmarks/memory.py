"""Peak memory of one measured step on CPU (resident set size), and glibc allocator settings that keep several
benchmark processes comparable.

Before the step the process resets its peak-RSS counter (writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM``
to the current RSS); after it, ``VmHWM`` is the highest RSS of the step: tensors, allocator slack, oneDNN scratch,
Python objects. Each method runs in its own process, so nothing of another method is counted. Where ``clear_refs`` is
not writable the lifetime peak (``ru_maxrss``) is used, and the results say so.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import resource
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import proc_field

MMAP_THRESHOLD = 32 * 2**20


def peak_rss_mib() -> float:
    """Highest RSS since the last :func:`reset_peak` (or since the process started), in MiB."""
    kib = proc_field("/proc/self/status", "VmHWM")
    if kib is not None:
        return kib / 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return maxrss / (2**20 if sys.platform == "darwin" else 1024)


def rss_mib() -> float:
    """Current resident set size in MiB (the lifetime peak where the OS does not say)."""
    kib = proc_field("/proc/self/status", "VmRSS")
    return peak_rss_mib() if kib is None else kib / 1024


def available_mib() -> float | None:
    """MemAvailable from /proc/meminfo, in MiB (None where unknown)."""
    kib = proc_field("/proc/meminfo", "MemAvailable")
    return None if kib is None else kib / 1024


def reset_peak() -> bool:
    """Reset the peak-RSS counter to the current RSS; False if the OS does not allow it (lifetime peak then)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@functools.cache
def _libc() -> Any:
    """glibc through ctypes, or None where it is not available."""
    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL(name) if name else None
        return libc if hasattr(libc, "malloc_trim") else None
    return None


def trim_heap() -> None:
    """Give free heap memory back to the OS (``malloc_trim(0)``; glibc only, a no-op elsewhere)."""
    if _libc():
        _libc().malloc_trim(0)


def fix_allocator_policy() -> bool:
    """Give glibc fixed thresholds, so that every worker allocates the same way whatever it ran before.

    glibc raises its mmap threshold on its own as large blocks are freed (up to 32 MiB) and trims the heap top past
    twice that, so a worker that ran a training step behaves unlike one that only ran inference. Fixing the threshold
    at 32 MiB (where a long training process ends up anyway) with automatic trimming off removes that difference.
    Returns False where this is not glibc.
    """
    libc = _libc()
    if not libc or not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def method_description() -> str:
    """How CPU peak memory is measured on this machine (stored with the results)."""
    if reset_peak():
        return "per-step peak RSS: VmHWM reset via /proc/self/clear_refs before the step, read after it"
    return "lifetime peak RSS (ru_maxrss): this OS does not allow resetting the peak; values are upper bounds"
