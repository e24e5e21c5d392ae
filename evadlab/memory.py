"""The C allocator of the processes that run the model: freed memory kept for the next step instead of handed back.

A training step allocates and frees tens of megabytes of tensors of varying sizes (the quickstart's: ~60 MB a step,
in blocks of 1 to 13 MB). glibc's malloc serves blocks above its mmap threshold with fresh ``mmap`` pages and returns
the heap's free top to the kernel past its trim threshold, so every step page-faults its tensors in again, and the
kernel zeroes each page: ~15,000 faults and ~30 ms of system time per quickstart step, ~10 % of the step
(``benchmarks/RESULTS.md`` §5). Fixing both thresholds (which also stops glibc's own adjustment of them) keeps the
freed blocks in the heap, where the next step reuses them. This is the remedy PyTorch's CPU performance guide gives
(there, by preloading jemalloc or tcmalloc), done with glibc's documented ``mallopt`` so that nothing has to be
installed or preloaded, and it works inside Ray's worker processes, which this process does not start.
"""

from __future__ import annotations

import ctypes

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2): blocks up to 32 MiB come from the
# heap; larger ones (a serialized checkpoint, ViT-B's activations) are still mapped and unmapped on their own.
MMAP_THRESHOLD_BYTES = 32 * 2**20
# Free memory at the top of the heap that is kept rather than returned: a few steps' worth of tensors.
TRIM_THRESHOLD_BYTES = 2**30


def reuse_freed_memory() -> bool:
    """Sets this process's glibc malloc thresholds (see the module's docstring); once per process is enough, more
    calls change nothing. Returns False, changing nothing, where the C library has no ``mallopt`` (macOS) or refuses
    the values (musl, whose ``mallopt`` does nothing)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                   TRIM_THRESHOLD_BYTES))
