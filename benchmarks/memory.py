"""Peak memory of one measured step, on CPU (resident set size) or CUDA (allocator statistics), and the glibc
allocator settings that keep several benchmark processes comparable.

CPU method (Linux): before the step the process resets its peak-RSS counter (writing ``5`` to
``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS); after the step ``VmHWM`` is the highest RSS reached
during the step. This counts everything the process holds: tensors, the allocator's slack, oneDNN scratch buffers,
Python objects. Each method runs in its own process, so nothing of another method is ever counted. Optionally the
heap is first given back to the OS (``malloc_trim(0)``), so that the peak is that of the step alone. Where
``clear_refs`` is not writable, the lifetime peak (``ru_maxrss``) is used and the result says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import resource
import sys
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib() -> float:
    """Current resident set size in MiB."""
    kib = _status_kib("VmRSS")
    if kib is None:  # not Linux: fall back to the lifetime peak, the best we have
        return peak_rss_mib()
    return kib / 1024


def peak_rss_mib() -> float:
    """Highest RSS since the last :func:`reset_peak` (or since the process started), in MiB."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def reset_peak() -> bool:
    """Reset the peak-RSS counter to the current RSS; False if the OS does not allow it (lifetime peak then)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


_LIBC: Any = None


def _load_libc() -> Any:
    """glibc through ctypes, or False where it is not available."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = False
        if name:
            with contextlib.suppress(OSError):
                libc = ctypes.CDLL(name)
                _LIBC = libc if hasattr(libc, "malloc_trim") else False
    return _LIBC


def trim_heap() -> None:
    """Give free heap memory back to the OS (glibc only; a no-op elsewhere)."""
    libc = _load_libc()
    if libc:
        libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20


def fix_allocator_policy() -> bool:
    """Give glibc fixed thresholds, so that every worker allocates the same way whatever it ran before.

    glibc raises its mmap threshold on its own when large blocks are freed (up to 32 MiB on 64-bit) and trims the
    top of the heap when it exceeds twice that; how far a process has got depends on its history (a worker that ran
    a training step behaves differently from one that only ran inference). Fixing the threshold at 32 MiB (where a
    long-running training process ends up anyway) and turning automatic trimming off removes that difference.
    Returns False where this is not glibc.
    """
    libc = _load_libc()
    if not libc or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def available_mib() -> float | None:
    """MemAvailable from /proc/meminfo, in MiB (None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def method_description() -> str:
    """How CPU peak memory is measured on this machine (stored with the results)."""
    if reset_peak():
        return "per-step peak RSS: VmHWM reset via /proc/self/clear_refs before the step, read after it"
    return "lifetime peak RSS (ru_maxrss): this OS does not allow resetting the peak; values are upper bounds"
