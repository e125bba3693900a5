"""Page-aligned buffers for O_DIRECT reads.

Anonymous private mmaps rather than numpy allocations, for two reasons: O_DIRECT needs the
destination aligned to the logical block size (a page is always enough), and the pool can give
memory back to the kernel (MADV_DONTNEED, munmap) the moment nothing uses it, so an evicted bundle
really leaves RSS (glibc's malloc may keep large freed blocks around).  MAP_PRIVATE matters too: a shared
anonymous map is shmem and would show up as page cache.

Read buffers ask for transparent huge pages (BufferPool's slabs for the engine, `read_buffer` for
probes).  An O_DIRECT read lands in the
buffer's physical pages, and the block layer turns each physically contiguous run into one
segment; a request holds at most max_segments of them (254 on the work machine's virtio disk), so
with 4 KiB pages a 4 MiB read went out as four 1 MiB requests.  That disk serves a bounded number
of requests a second: 4 MiB reads into 4 KiB pages gave 0.8-1.1 GB/s, into huge pages 1.9-2.5 GB/s
(one to four readers, random offsets, alternating).  Pinning 2 MiB pages also costs the kernel less
than 512 small ones (sys time per 4 MiB read: ~300 us -> ~90 us).
"""
from __future__ import annotations

import ctypes
import mmap
import sys
import threading
from contextlib import contextmanager

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
    _advise_pages(buf, huge)
    _fault_in(buf)
    return buf


def _advise_pages(mem: mmap.mmap, huge: bool) -> None:
    """Ask for transparent huge pages (or for none); where THP is compiled out or not allowed the map
    keeps small pages."""
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge else "MADV_NOHUGEPAGE", None)
    if advice is not None:
        try:
            mem.madvise(advice)
        except OSError:
            pass


def _fault_in(buf) -> None:
    """Touch every page now: a read into unfaulted pages would pay for the faults itself."""
    np.frombuffer(buf, np.uint8)[::ALIGN] = 0


#: transparent huge page size on x86-64 and most arm64 kernels
HUGE_PAGE = 2 << 20
#: slots per slab at most; a slab is sized so that its slots fill whole huge pages (or nearly)
MAX_SLOTS = 16
#: a slab may leave this share of its last huge page unused
SLAB_WASTE = 0.02


def slab_is_huge(size: int) -> bool:
    """Whether slabs of `size`-byte slots ask for huge pages: only where a slab spans at least one
    (smaller slots lose nothing in small pages: a read of 16 pages is one request anyway, and a
    huge page faulted for one small slot would hold 2 MiB of RAM)."""
    return size * MAX_SLOTS >= HUGE_PAGE


def slots_per_slab(size: int) -> int:
    """How many `size`-byte slots one slab holds: in huge pages, the fewest whose total is (nearly)
    a whole number of them, so no slot ends in a partial huge page's small pages."""
    if not slab_is_huge(size):
        return MAX_SLOTS
    best, best_waste = 1, float("inf")
    for k in range(1, MAX_SLOTS + 1):
        waste = (align_up(k * size, HUGE_PAGE) - k * size) / (k * size)
        if waste <= SLAB_WASTE:
            return k
        if waste < best_waste:
            best, best_waste = k, waste
    return best


class _Slab:
    """One mapping (in huge pages where slab_is_huge) cut into equal slots.  A slot is a ctypes array
    over its bytes: numpy views and memoryviews of it hold a reference to that object (numpy would
    collapse a view of a view onto the mapping itself), so its reference count says whether anyone
    still uses it."""

    def __init__(self, size: int, k: int):
        self.size = size
        huge = slab_is_huge(size)
        # One spare huge page of address space (never touched, so never resident) lets the slots start
        # on a 2 MiB boundary wherever the kernel put the map.
        span = align_up(k * size, HUGE_PAGE) + HUGE_PAGE if huge else k * size
        self.mem = mmap.mmap(-1, span, flags=mmap.MAP_PRIVATE)
        _advise_pages(self.mem, huge)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        self.start = (-base) % HUGE_PAGE if huge else 0
        kind = ctypes.c_ubyte * size
        self.slots = [kind.from_buffer(self.mem, self.start + i * size) for i in range(k)]
        self.faulted = 0   # slots faulted in (or being faulted in): handed out, or kept for reuse

    def fault_in(self, i: int) -> None:
        _fault_in(self.slots[i])

    def release(self, i: int) -> None:
        """Give slot i's memory back to the kernel; it reads as zeros and faults in again when reused."""
        dontneed = getattr(mmap, "MADV_DONTNEED", None)
        if dontneed is not None:   # (where there is none, the memory stays until the slab is unmapped)
            self.mem.madvise(dontneed, self.start + i * self.size, self.size)
        self.faulted -= 1


def _unused_refs() -> int:
    """References a slot has when only its slab holds it (as counted inside BufferPool)."""
    slab = _Slab(ALIGN, 1)
    return sys.getrefcount(slab.slots[0])   # the same expression the pool uses


class BufferPool:
    """Read buffers: slots of huge-page slabs, handed out again once the bundle in them left the cache.

    Why slabs: a 3.5 MiB bundle in its own map ends in 1.5 MiB of small pages (the kernel cannot give
    a partial huge page), whose 384 segments made the block layer split the read, and 3.5 MiB reads
    into such buffers gave 0.9-1.6 GB/s on the work disk against 2.3-2.6 for the same reads into
    slots of a slab of whole huge pages (`python -m bench.disk_requests FILE`).  Rounding each
    buffer up to 4 MiB would read as fast but hold 14% more memory per bundle.

    A fresh slot costs its page faults (for 3.5 MiB on the work VM 0.35-0.5 ms, and 5-12 ms at moments
    when the host has taken the free memory back: docs/BENCHMARKS.md); a reused one costs nothing.  A
    slot is reused only once nothing refers to it any more (its reference count: every numpy view of
    a bundle holds one), so a bundle a caller still computes with is never overwritten.  Slots given
    back with put() keep their memory up to `limit` bytes (more while a caller is `expecting` to get
    them); beyond that the oldest are released to the kernel (MADV_DONTNEED) once unused, and a slab
    whose slots are all released is unmapped, so an evicted bundle really leaves RSS.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._slabs: dict[int, list[_Slab]] = {}        # by slot size
        self._where: dict[int, tuple[_Slab, int]] = {}  # id(slot) -> its slab and index
        self._idle: dict[int, list[tuple[_Slab, int]]] = {}  # slots not faulted in, by size
        self._free: dict[int, list[object]] = {}        # put back, memory kept, by size (oldest first)
        self._releasing: list[object] = []               # put back past the limit: released once unused
        self._bytes = 0                                  # memory held by slots in _free
        self._expected = 0                               # bytes callers said they are about to get()
        self._lock = threading.Lock()
        self.reused = 0
        self.allocated = 0

    def put(self, buf) -> None:
        """Give a buffer back (every buffer get() hands out must come back: one that does not keeps its
        memory until the pool goes)."""
        n = len(buf)
        with self._lock:
            if id(buf) not in self._where:
                return
            self._free.setdefault(n, []).append(buf)
            self._bytes += n
            self._trim()

    def _trim(self) -> None:
        """Pass the oldest kept slots beyond the limit (plus what callers expect to get) on for release."""
        while self._bytes > self.limit + self._expected:
            size, lst = next((s, lst) for s, lst in self._free.items() if lst)
            self._releasing.append(lst.pop(0))
            self._bytes -= size
        self._collect()

    @contextmanager
    def expecting(self, nbytes: int):
        """Within this block, keep up to `nbytes` more of the slots put back than the limit allows.

        A batch of reads first makes room in the cache (each eviction puts a slot back), then gets its
        buffers: with more reads than the limit holds, the slots just freed would be released and the
        batch would fault fresh memory in for every read past the limit.  A prompt's first pass reads
        up to a whole layer's experts at once (64 on OLMoE, against 8 slots kept): ~80 fresh 3.5 MiB
        slots a 32-token prompt, each 0.35-12 ms of page faults on the work VM."""
        with self._lock:
            self._expected += nbytes
        try:
            yield
        finally:
            with self._lock:
                self._expected -= nbytes
                self._trim()

    def get(self, nbytes: int):
        size = max(align_up(nbytes), ALIGN)
        with self._lock:
            self._collect()
            lst = self._free.get(size, [])
            for i in range(len(lst)):
                # (by index: a loop variable would hold one more reference)
                if sys.getrefcount(lst[i]) <= _UNUSED_REFS + 1:   # + 1: the list holds it too
                    self._bytes -= size
                    self.reused += 1
                    return lst.pop(i)
            self.allocated += 1
            idle = self._idle.setdefault(size, [])
            if not idle:
                slab = _Slab(size, slots_per_slab(size))
                self._slabs.setdefault(size, []).append(slab)
                for i in range(len(slab.slots)):
                    self._where[id(slab.slots[i])] = (slab, i)
                idle.extend((slab, i) for i in reversed(range(len(slab.slots))))
            slab, i = idle.pop()
            slab.faulted += 1
        # Outside the lock: faulting 3.5 MiB in can take milliseconds, and the slot is ours alone now.
        slab.fault_in(i)
        return slab.slots[i]

    def _collect(self) -> None:
        """Release the memory of slots past the limit that nobody uses any more, and unmap a slab once
        none of its slots is faulted in (handed out, or kept for reuse)."""
        still = []
        for j in range(len(self._releasing)):
            if sys.getrefcount(self._releasing[j]) > _UNUSED_REFS + 1:   # + 1: the list
                still.append(self._releasing[j])
                continue
            slab, i = self._where[id(self._releasing[j])]
            slab.release(i)
            if slab.faulted:
                self._idle[slab.size].append((slab, i))
            else:
                self._slabs[slab.size].remove(slab)
                self._idle[slab.size] = [(s, k) for s, k in self._idle[slab.size] if s is not slab]
                for k in range(len(slab.slots)):
                    del self._where[id(slab.slots[k])]
        self._releasing = still

    def collect(self) -> None:
        """Release what can be released now (get and put do this too)."""
        with self._lock:
            self._collect()

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def mapped_bytes(self) -> int:
        """Bytes of the slots currently faulted in (handed out, or kept for reuse)."""
        with self._lock:
            return sum(s.size * s.faulted for slabs in self._slabs.values() for s in slabs)


_UNUSED_REFS = _unused_refs()
