"""Peak memory of one measured step, on CPU (resident set size) or CUDA (allocator statistics).

CPU method (Linux): before the step the process gives its free heap back to the OS (``malloc_trim(0)``) and resets its
peak-RSS counter (writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS); after the step
``VmHWM`` is the highest RSS reached during the step. This counts everything the step really touched: tensors, the
allocator's slack, oneDNN scratch buffers, Python objects. Each method runs in its own process, so nothing of
another method is ever counted. Where ``clear_refs`` is not writable, the lifetime peak (``ru_maxrss``) is used and
the result says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import resource
import sys
from pathlib import Path

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


_LIBC = None


def trim_heap() -> None:
    """Give free heap memory back to the OS (glibc only; a no-op elsewhere)."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = False
        if name:
            with contextlib.suppress(OSError):
                libc = ctypes.CDLL(name)
                _LIBC = libc if hasattr(libc, "malloc_trim") else False
    if _LIBC:
        _LIBC.malloc_trim(0)


def method_description() -> str:
    """How CPU peak memory is measured on this machine (stored with the results)."""
    if reset_peak():
        return "per-step peak RSS: malloc_trim(0) + reset VmHWM via /proc/self/clear_refs before the step, VmHWM after"
    return "lifetime peak RSS (ru_maxrss): this OS does not allow resetting the peak; values are upper bounds"
