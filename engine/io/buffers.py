"""Page-aligned buffers for O_DIRECT reads.

Anonymous private mmaps rather than numpy allocations, for two reasons: O_DIRECT needs the
destination aligned to the logical block size (a page is always enough), and unmapping returns
the memory to the kernel the moment the last view is dropped, so an evicted bundle really leaves
RSS (glibc's malloc may keep large freed blocks around).  MAP_PRIVATE matters too: a shared
anonymous map is shmem and would show up as page cache.
"""
from __future__ import annotations

import mmap

#: every O_DIRECT offset, length and buffer address is a multiple of this (covers 512 B and 4 KiB sectors)
ALIGN = 4096


def align_down(n: int, a: int = ALIGN) -> int:
    return n - n % a


def align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """A zero-filled, page-aligned, private anonymous buffer of at least `nbytes` (rounded up to ALIGN)."""
    return mmap.mmap(-1, max(align_up(nbytes), ALIGN), flags=mmap.MAP_PRIVATE)
