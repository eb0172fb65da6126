"""Keep freed memory in the process for reuse.

glibc's malloc serves every block above 32 MiB (and, by its sliding threshold, many smaller ones)
with a fresh ``mmap`` and hands it back to the OS on free. A training step frees and reallocates
the same large activations every step, so each of them is page-faulted in again, page by page:
on a 2-core CPU that doubled the time of the elementwise ops on Dreamer's convolution activations
(SiLU on a 134 MB tensor: 77 ms, 39 ms with freed memory kept), and it is where TD-MPC2's page
faults per update came from. Serving large blocks from the heap, and not trimming it, keeps the
pages mapped: the next step reuses them without a fault.

The cost is memory held: the heap grows over the first steps until the step's pattern of blocks
fits in it, and stays there. Dreamer S on Atari-size batches, 10 updates: 3.1 GB resident with
freed memory kept; without it 1.2-1.4 GB between updates (2.7 GB at its peak), with each update
about 20% slower on one thread. Set ``FLATWORLD_KEEP_FREED_MEMORY=0`` to leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # glibc's mallopt parameters
_done: bool | None = None


def keep_freed_memory(trim: int = 1 << 30, top_pad: int = 64 << 20) -> bool:
    """Tell glibc's malloc to serve large blocks from the heap and keep freed memory (up to
    ``trim`` bytes free at its top) for reuse. Once per process; True where it took effect
    (glibc on Linux, not turned off by ``FLATWORLD_KEEP_FREED_MEMORY=0``)."""
    global _done
    if _done is not None:
        return _done
    setting = os.environ.get("FLATWORLD_KEEP_FREED_MEMORY", "1")
    if setting not in ("0", "1"):
        raise ValueError(f"FLATWORLD_KEEP_FREED_MEMORY={setting!r}; accepted: 0 or 1")
    _done = False
    if setting == "1" and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            return _done
        _done = bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, trim)
                     and mallopt(_M_TOP_PAD, top_pad))  # fmt: skip
    return _done
