"""`mmap` reader: the page-cache baseline.  Bytes are copied out of a shared file mapping.

Copied rather than viewed so the RAM tier's budget means the same thing for every reader; the
mapped range is then dropped from this process (MADV_DONTNEED) so RSS holds only the copy, while
the kernel's page cache keeps the pages as an implicit, unaccounted second tier.
"""
from __future__ import annotations

import errno
import mmap
import os
import time
from collections.abc import Sequence

from .base import Reader, ReadJob, ShortRead

PAGE = mmap.PAGESIZE


class MmapReader(Reader):
    name = "mmap"

    def __init__(self, paths: Sequence[str | os.PathLike]):
        super().__init__(paths)
        self._maps: list[mmap.mmap | None] = []
        self._fds: list[int] = []
        for p in self.paths:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            self._fds.append(fd)
            size = os.fstat(fd).st_size
            self._maps.append(mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else None)

    def read(self, jobs: Sequence[ReadJob]) -> None:
        spans = [(job, s) for job in jobs for s in job.spans]
        for _, s in spans:  # let the kernel read ahead for every span before we fault on the first
            m = self._maps[s.file]
            if m is not None:
                a = s.offset - s.offset % PAGE
                n = min(s.offset + s.length, len(m)) - a
                if n > 0:
                    m.madvise(mmap.MADV_WILLNEED, a, n)
        for job, s in spans:
            if job.error is not None:
                continue
            t0 = time.perf_counter()
            self.stats.started()
            got = 0
            try:
                m = self._maps[s.file]
                size = os.fstat(self._fds[s.file]).st_size
                # Touching a page past the end of a file that shrank raises SIGBUS, not an error: check first.
                end = min(s.offset + s.length, len(m) if m is not None else 0, size)
                got = max(0, end - s.offset)
                if got < s.need:
                    raise ShortRead(self.paths[s.file], s.offset, got, s.need)
                whole = memoryview(m)
                part = whole[s.offset:end]
                try:
                    s.dest[:got] = part   # one memcpy from the mapping, no intermediate bytes
                finally:
                    part.release()
                    whole.release()
                a = s.offset - s.offset % PAGE
                m.madvise(mmap.MADV_DONTNEED, a, end - a)
            except OSError as e:
                job.error = e
            except (ValueError, IndexError) as e:
                job.error = OSError(errno.EIO, str(e), str(self.paths[s.file]))
            finally:
                self.stats.finished(got, time.perf_counter() - t0)

    def close(self) -> None:
        for m in self._maps:
            if m is not None:
                m.close()
        for fd in self._fds:
            os.close(fd)
        self._maps, self._fds = [], []
