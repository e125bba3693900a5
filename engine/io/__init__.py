"""Readers that fill aligned buffers from expert files: io_uring, a pread thread pool, or mmap.

open_reader("auto", ...) prefers io_uring with O_DIRECT, falls back to the pread pool, and to buffered
reads where the filesystem refuses O_DIRECT; the reason is logged and kept in reader.reason.
"""
from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence

from ..errors import EngineError
from .base import CHUNK, IoStats, Reader, ReadJob, ShortRead, Span, split
from .buffers import ALIGN, align_down, align_up, aligned_buffer
from .mmap_reader import MmapReader
from .pread import PreadReader

log = logging.getLogger("engine.io")

READERS = ("auto", "uring", "pread", "mmap")
#: default requests in flight: the work disk reaches its random-read bandwidth near 8-16
DEFAULT_QUEUE_DEPTH = 16

_HINTS = {
    errno.ENOSYS: "the kernel has no io_uring (older than 5.1, or compiled out)",
    errno.EPERM: "io_uring is disabled (sysctl kernel.io_uring_disabled) or blocked by seccomp",
    errno.EACCES: "io_uring is disabled for this user (sysctl kernel.io_uring_disabled)",
}


def _uring(paths: Sequence[str | os.PathLike], queue_depth: int, staging: bool) -> Reader:
    from .uring import UringReader

    return UringReader(paths, queue_depth=queue_depth, staging=staging)


def _why(e: OSError) -> str:
    hint = _HINTS.get(e.errno or 0)
    return f"{e.strerror or e}" + (f": {hint}" if hint else "")


def _probe(reader: Reader) -> None:
    """One small read of each file, so a filesystem that refuses O_DIRECT shows before the first real read."""
    bufs = [aligned_buffer(ALIGN) for _ in reader.paths]
    jobs = [ReadJob([Span(i, 0, ALIGN, 0, memoryview(b))]) for i, b in enumerate(bufs)]
    reader.read(jobs)
    for job in jobs:
        for s in job.spans:
            s.dest.release()
    for b in bufs:
        b.close()
    reader.stats.reset()   # the probe is not the model's I/O


def open_reader(kind: str, paths: Sequence[str | os.PathLike], queue_depth: int | None = None,
                staging: bool = False) -> Reader:
    """A reader of `paths`; kind is auto, uring, pread or mmap.  reader.reason says why it is what it is."""
    qd = queue_depth or DEFAULT_QUEUE_DEPTH
    if kind not in READERS:
        raise EngineError(f"io: unknown reader {kind!r} (choose from {', '.join(READERS)})")
    if kind == "mmap":
        r: Reader = MmapReader(paths)
        r.reason = "mmap: page cache (asked for)"
        return r
    if kind in ("uring", "auto"):
        try:
            r = _uring(paths, qd, staging)
        except OSError as e:
            if kind == "uring":
                raise EngineError(f"io: uring is not available here: {_why(e)}") from None
            why = f"io_uring unavailable ({_why(e)}); pread thread pool"
            r = PreadReader(paths, queue_depth=qd)
            _probe(r)
            r.reason = "; ".join(x for x in (why, r.reason) if x)
            log.info("expert reader: %s", r.reason)
            return r
        _probe(r)
        r.reason = r.reason or ("io_uring with O_DIRECT" + (" (asked for)" if kind == "uring" else ""))
        log.info("expert reader: %s", r.reason)
        return r
    r = PreadReader(paths, queue_depth=qd)
    _probe(r)
    r.reason = r.reason or "pread thread pool with O_DIRECT (asked for)"
    log.info("expert reader: %s", r.reason)
    return r


__all__ = ["ALIGN", "CHUNK", "DEFAULT_QUEUE_DEPTH", "IoStats", "MmapReader", "PreadReader", "READERS",
           "Reader", "ReadJob", "ShortRead", "Span", "align_down", "align_up", "aligned_buffer",
           "open_reader", "split"]
