"""glibc malloc settings for decoding on a CPU: large tensors from the heap, freed memory kept."""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc's malloc.h) and the value both are set to: mallopt takes a C int.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
THRESHOLD = 2**31 - 1


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to 2 GiB for this process; whether they were set.

    Under glibc's defaults every allocation over the mmap threshold (which adapts, up to 32 MiB) is
    fresh memory from the kernel, page-faulted in as it is first written, several times the cost of
    writing reused memory. A decode allocates such tensors every step (the logits, [rows, vocab]
    float32, from 263 rows at a 32k vocabulary), and the dense model more of them than a locked pass. With
    the thresholds raised they come from malloc's heap and freed memory stays there for the next
    step; the price is that the process keeps its peak memory resident. The same settings as the
    environment variables ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``, made from
    within a running process; a no-op (False) where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
