"""Page-aligned buffers for O_DIRECT reads.

Anonymous private mmaps rather than numpy allocations, for two reasons: O_DIRECT needs the
destination aligned to the logical block size (a page is always enough), and unmapping returns
the memory to the kernel the moment the last view is dropped, so an evicted bundle really leaves
RSS (glibc's malloc may keep large freed blocks around).  MAP_PRIVATE matters too: a shared
anonymous map is shmem and would show up as page cache.
"""
from __future__ import annotations

import mmap
import sys
import threading

#: every O_DIRECT offset, length and buffer address is a multiple of this (covers 512 B and 4 KiB sectors)
ALIGN = 4096


def align_down(n: int, a: int = ALIGN) -> int:
    return n - n % a


def align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """A zero-filled, page-aligned, private anonymous buffer of at least `nbytes` (rounded up to ALIGN)."""
    return mmap.mmap(-1, max(align_up(nbytes), ALIGN), flags=mmap.MAP_PRIVATE)


def _free_refs() -> int:
    """References a pooled buffer has when nothing but the pool holds it (as counted inside get())."""
    pool = [mmap.mmap(-1, ALIGN, flags=mmap.MAP_PRIVATE)]
    return sys.getrefcount(pool[0])   # the same expression get() uses


class BufferPool:
    """Buffers of bundles that left the cache, handed out again for the next reads of the same size.

    A fresh buffer costs its page faults: on this VM, mapping, touching and unmapping 3 MiB costs
    ~5 ms (2.3 ms pre-faulted), as much as reading it; a reused one costs nothing.  A buffer is
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
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_POPULATE)

    @property
    def nbytes(self) -> int:
        return self._bytes


_FREE_REFS = _free_refs()
