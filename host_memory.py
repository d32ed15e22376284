"""glibc malloc settings for the processes that move multi-GB state dicts: the server, the sites, NVFlare's relays.

NVFlare moves a state dict through one buffer after another: a safetensors copy of each tensor, stream chunks,
reassembled messages, most of them 1-32 MiB. By default glibc gives a buffer above its mmap threshold (128 KiB at
first, raised as such buffers are freed) a mapping of its own, and hands freed heap tops back to the OS once they
pass twice that threshold, so many of these buffers are new memory whose pages the kernel faults in and zero-fills
on first touch: 2.2-3.2 us a page on the H200 machine, 0.55-0.8 ms per MB, four to five times a copy into reused
memory (bench/bench_host_floor.py). With these settings buffers up to 32 MiB come from the heap and are reused; only
larger ones (the 622 MB token embedding) still get a mapping of their own. NVFlare's per-round `malloc_trim` still
returns the freed memory to the OS.

Reuse needs few arenas. glibc gives threads up to 8 arenas per core (128 on a 16-core machine) and NVFlare moves the
weights in hundreds of threads, so by default each arena kept its own freed buffers until that trim: on the H200
machine each site's trainer grew by about 4 GiB during every upload, and the server peaked at 17.2 GiB. Two arenas
shared by all threads reuse the same buffers (BENCHMARKS.md: trainers under 5 GiB, the server at 10.4 GiB, 25.8 GiB
instead of 47.5 GiB for the whole run, at the same speed).

`ENV` is for processes started from here (glibc reads it at start-up); `apply()` sets the same in this process.
"""

from __future__ import annotations

import ctypes

MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit machines
TRIM_THRESHOLD = 256 * 2**20
TOP_PAD = 64 * 2**20
ARENA_MAX = 2

ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
    "MALLOC_TOP_PAD_": str(TOP_PAD),
    "MALLOC_ARENA_MAX": str(ARENA_MAX),
}

# mallopt() parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8


def apply() -> bool:
    """Set the thresholds in the running process. False where the C library has no glibc `mallopt`."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, TOP_PAD),
        (_M_ARENA_MAX, ARENA_MAX),
    )
    return all(mallopt(param, value) == 1 for param, value in settings)
