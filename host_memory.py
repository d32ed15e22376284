"""glibc malloc settings for the processes that move multi-GB state dicts: the server, the sites, NVFlare's relays.

NVFlare moves a state dict through one buffer after another: a safetensors copy of each tensor, stream chunks,
reassembled messages, most of them 1-32 MiB. By default glibc gives every buffer above its mmap threshold (128 KiB
at first, raised as buffers are freed) a fresh mapping, and hands freed heap tops back to the OS once they pass
twice that threshold. Nearly every buffer is then new memory whose pages the kernel zero-fills on first touch: on
the 2-core CI machine that was two thirds of an exchange's CPU time (7 million page faults to move 4 GB). With these
settings buffers up to 32 MiB come from the heap and are reused; only larger ones (the 622 MB token embedding) still
get a mapping of their own. NVFlare's per-round `malloc_trim` still returns the freed memory to the OS.

`ENV` is for processes started from here (glibc reads it at start-up); `apply()` sets the same in this process.
"""

from __future__ import annotations

import ctypes

MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit machines
TRIM_THRESHOLD = 256 * 2**20
TOP_PAD = 64 * 2**20

ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
    "MALLOC_TOP_PAD_": str(TOP_PAD),
}

# mallopt() parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def apply() -> bool:
    """Set the thresholds in the running process. False where the C library has no glibc `mallopt`."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)
