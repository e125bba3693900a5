"""Page-aligned buffers for O_DIRECT reads.

Anonymous private mmaps rather than numpy allocations, for two reasons: O_DIRECT needs the
destination aligned to the logical block size (a page is always enough), and unmapping returns
the memory to the kernel the moment the last view is dropped, so an evicted bundle really leaves
RSS (glibc's malloc may keep large freed blocks around).  MAP_PRIVATE matters too: a shared
anonymous map is shmem and would show up as page cache.

Read buffers ask for transparent huge pages (`read_buffer`).  An O_DIRECT read lands in the
buffer's physical pages, and the block layer turns each physically contiguous run into one
segment; a request holds at most max_segments of them (254 on the work machine's virtio disk), so
with 4 KiB pages a 4 MiB read went out as four 1 MiB requests.  That disk serves a bounded number
of requests a second: 4 MiB reads into 4 KiB pages gave 0.8-1.1 GB/s, into huge pages 1.9-2.5 GB/s
(one to four readers, random offsets, alternating).  Pinning 2 MiB pages also costs the kernel less
than 512 small ones (sys time per 4 MiB read: ~300 us -> ~90 us).
"""
from __future__ import annotations

import mmap
import sys
import threading

import numpy as np

#: every O_DIRECT offset, length and buffer address is a multiple of this (covers 512 B and 4 KiB sectors)
ALIGN = 4096


def align_down(n: int, a: int = ALIGN) -> int:
    return n - n % a


def align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """A zero-filled, page-aligned, private anonymous buffer of at least `nbytes` (rounded up to ALIGN)."""
    return mmap.mmap(-1, max(align_up(nbytes), ALIGN), flags=mmap.MAP_PRIVATE)


def read_buffer(nbytes: int, huge: bool = True) -> mmap.mmap:
    """aligned_buffer backed by transparent huge pages where the kernel grants them (THP "always" or
    "madvise"; elsewhere 4 KiB pages as before), with every page faulted in.  huge=False asks for
    small pages instead (for measurements that compare the two).

    MAP_POPULATE cannot be used: it faults 4 KiB pages before the advice is given.  Huge pages cover
    the buffer's whole 2 MiB-aligned stretches (the kernel aligns large anonymous maps); a tail
    smaller than 2 MiB stays in small pages."""
    buf = aligned_buffer(nbytes)
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge else "MADV_NOHUGEPAGE", None)
    if advice is not None:
        try:
            buf.madvise(advice)
        except OSError:   # THP compiled out or not allowed: small pages, as before
            pass
    # Fault the pages in now: a read into an unfaulted buffer would pay for the faults itself.
    np.frombuffer(buf, np.uint8)[::ALIGN] = 0
    return buf


def _free_refs() -> int:
    """References a pooled buffer has when nothing but the pool holds it (as counted inside get())."""
    pool = [mmap.mmap(-1, ALIGN, flags=mmap.MAP_PRIVATE)]
    return sys.getrefcount(pool[0])   # the same expression get() uses


class BufferPool:
    """Buffers of bundles that left the cache, handed out again for the next reads of the same size.

    A fresh buffer costs its page faults: on this VM, mapping and faulting in a 3.5 MiB buffer took
    ~1.2 ms in small pages (MAP_POPULATE) and ~0.8 ms as read_buffer makes it (medians of 50), half
    of reading it; a reused one costs nothing.  A buffer is
    reused only once nothing refers to it any more (its reference count: every numpy view of a
    bundle holds one), so a bundle a caller still computes with is never overwritten.  At most
    `limit` bytes wait in the pool; beyond that the oldest are let go (unmapped when unreferenced).
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._free: dict[int, list[mmap.mmap]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.reused = 0
        self.allocated = 0

    def put(self, buf: mmap.mmap) -> None:
        n = len(buf)
        with self._lock:
            if n > self.limit:
                return
            while self._bytes + n > self.limit:
                size, lst = next((s, lst) for s, lst in self._free.items() if lst)
                lst.pop(0)
                self._bytes -= size
            self._free.setdefault(n, []).append(buf)
            self._bytes += n

    def get(self, nbytes: int) -> mmap.mmap:
        size = max(align_up(nbytes), ALIGN)
        with self._lock:
            lst = self._free.get(size, [])
            for i in range(len(lst)):
                if sys.getrefcount(lst[i]) <= _FREE_REFS:
                    self._bytes -= size
                    self.reused += 1
                    return lst.pop(i)
            self.allocated += 1
        return read_buffer(size)

    @property
    def nbytes(self) -> int:
        return self._bytes


_FREE_REFS = _free_refs()
