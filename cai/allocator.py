"""Keep freed memory in the process while PyTorch trains on the CPU (glibc only).

glibc hands large blocks back to the kernel when they are freed: blocks over its mmap threshold are
unmapped, and a heap whose free top grows past the trim threshold is shrunk. A training step frees
and reallocates the same activation and gradient tensors every time (and under bf16 autocast a
bf16 copy of every weight), so each step faults their pages back in, zero-filled by the kernel.
A 4-step DPO run of SmolLM2-135M with bf16 autocast on 2 Xeon cores spent 54 s of CPU in the
kernel over 80 s of wall time; kept, 25 s over 55 to 65 s. `bench/train.py` measures it whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)

# mallopt(3) parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
NEVER_TRIM = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely."
DEFAULT_MMAP_MAX = 65536
# Where glibc's own adaptive thresholds settle once blocks of 32 MiB or more have been freed (as
# loading any model does): the mmap threshold's 64-bit ceiling, and twice that for trimming.
SETTLED_MMAP_THRESHOLD = 32 * 1024 * 1024
SETTLED_TRIM_THRESHOLD = 2 * SETTLED_MMAP_THRESHOLD


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc's handle, or None on another C library (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """Within the block, freed memory stays in the process's heap for reuse: no block is mmapped
    on its own and the heap is never trimmed. Yields whether that applies (False off glibc).

    On exit the free memory goes back to the kernel at once (malloc_trim), and mmap and trimming
    resume. Once set, glibc's thresholds no longer adapt to the sizes freed, so they are set where
    that adaptation leads in a process that has loaded a model."""
    libc = _glibc()
    if libc is None:
        yield False
        return
    applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
    if not applied:
        log.debug("mallopt refused the settings; training with glibc's defaults")
    try:
        yield applied
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, SETTLED_TRIM_THRESHOLD)
        libc.malloc_trim(0)
