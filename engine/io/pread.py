"""`pread` reader: a thread pool issuing preadv into aligned buffers, O_DIRECT where the filesystem allows.

os.preadv releases the GIL, so `queue_depth` threads keep that many requests in flight while the
model computes on another core.  Without O_DIRECT (fallback) it is the same code through the page cache.
"""
from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait

from .base import CHUNK, FileSet, Reader, ReadJob, ShortRead, Span, split


class PreadReader(Reader):
    name = "pread"

    def __init__(self, paths: Sequence[str | os.PathLike], queue_depth: int = 8, direct: bool = True,
                 chunk: int = CHUNK):
        super().__init__(paths)
        self.files = FileSet(self.paths, direct)
        self.files.open()
        self.chunk = chunk
        self.queue_depth = max(1, int(queue_depth))
        self._pool = ThreadPoolExecutor(self.queue_depth, thread_name_prefix="mer-pread")
        self._swap = threading.Lock()
        self.reason = self.files.buffered_reason

    @property
    def direct(self) -> bool:
        return self.files.direct and not self.files.buffered_reason

    def set_queue_depth(self, n: int) -> None:
        n = max(1, int(n))
        if n != self.queue_depth:
            old, self._pool = self._pool, ThreadPoolExecutor(n, thread_name_prefix="mer-pread")
            self.queue_depth = n
            old.shutdown(wait=False)

    def _one(self, s: Span) -> None:
        t0 = time.perf_counter()
        self.stats.started()
        got = 0
        try:
            fd = self.files.fds[s.file]
            try:
                got = os.preadv(fd, [s.dest], s.offset)
            except OSError as e:
                # Some filesystems accept O_DIRECT at open and refuse it per read: fall back once.
                if e.errno != errno.EINVAL or not self.files.direct or s.file in self.files.buffered:
                    raise
                with self._swap:
                    if self.files.fds[s.file] == fd:
                        self.files.to_buffered(s.file, "O_DIRECT read refused (EINVAL)")
                        self.reason = self.files.buffered_reason
                got = os.preadv(self.files.fds[s.file], [s.dest], s.offset)
            # A buffered read may legitimately return less than asked; continue until EOF.
            while got < s.need:
                more = os.preadv(self.files.fds[s.file], [s.dest[got:]], s.offset + got)
                if more <= 0:
                    raise ShortRead(self.paths[s.file], s.offset, got, s.need)
                got += more
        finally:
            self.stats.finished(got, time.perf_counter() - t0)

    def read(self, jobs: Sequence[ReadJob]) -> None:
        futures = {}
        for job in jobs:
            for s in job.spans:
                for part in split(s, self.chunk):
                    futures[self._pool.submit(self._one, part)] = job
        wait(futures)
        for f, job in futures.items():
            e = f.exception()
            if e is not None and job.error is None:
                job.error = e if isinstance(e, OSError) else OSError(errno.EIO, str(e))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.files.close()
