"""`uring` reader: io_uring through raw syscalls in a small cffi module, O_DIRECT, all requests of a
batch in flight together up to a configurable queue depth.

Rings come from a pool, one per concurrent caller (the model thread and the prefetch thread), so no
ring is ever shared.  By default reads land straight in the caller's page-aligned buffers: the
kernel pins those pages per request, which costs less than the copy that registered buffers would
need (the bundle's memory is the cache's, not a fixed arena).  `staging=True` instead reads into
registered buffers (IORING_OP_READ_FIXED) and copies out in C; bench/bench_streaming.py measures both.
"""
from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence

from .base import CHUNK, FileSet, IoStats, Reader, ReadJob, ShortRead, Span, split
from .buffers import aligned_buffer
from .uring_build import load_uring

RING_ENTRIES = 64
STAGING_CHUNK = 1 << 20   # bytes of one registered staging buffer


class _Ring:
    def __init__(self, mod, queue_depth: int, staging: bool, chunk: int):
        self.ffi, self.lib = mod.ffi, mod.lib
        err = self.ffi.new("int *")
        ptr = self.lib.mer_ring_new(RING_ENTRIES, self.lib.MER_SETUP_COOP_TASKRUN, err)
        if ptr == self.ffi.NULL:   # COOP_TASKRUN is 5.19+: try again without it
            ptr = self.lib.mer_ring_new(RING_ENTRIES, 0, err)
        if ptr == self.ffi.NULL:
            raise OSError(err[0], f"io_uring_setup failed: {os.strerror(err[0])}")
        self.ptr = ptr
        self.staging: list = []
        self.n_staging = 0
        if staging:
            n = min(queue_depth, RING_ENTRIES)
            self._arena = aligned_buffer(n * chunk)
            view = self.ffi.from_buffer(self._arena)
            self.staging = self.ffi.new("char *[]", [view + i * chunk for i in range(n)])
            self._keep = view
            rc = self.lib.mer_ring_register_buffers(ptr, self.staging, chunk, n)
            if rc < 0:
                self.free()
                raise OSError(-rc, f"io_uring buffer registration failed: {os.strerror(-rc)}")
            self.n_staging = n

    def inflight(self) -> int:
        return int(self.lib.mer_ring_inflight(self.ptr)) if self.ptr is not None else 0

    def free(self) -> None:
        if self.ptr is not None:
            self.lib.mer_ring_free(self.ptr)
            self.ptr = None


class UringReader(Reader):
    name = "uring"

    def __init__(self, paths: Sequence[str | os.PathLike], queue_depth: int = 16, direct: bool = True,
                 chunk: int = CHUNK, staging: bool = False):
        super().__init__(paths)
        self._mod = load_uring()
        # Staged reads land in registered buffers of `chunk` bytes each, queue_depth of them: keep
        # those at 1 MiB (16 MiB registered) rather than the 4 MiB direct requests use.
        self.chunk = min(chunk, STAGING_CHUNK) if staging else chunk
        self.queue_depth = max(1, min(int(queue_depth), RING_ENTRIES))
        self.staging = staging
        self._lock = threading.Lock()
        self._free: list[_Ring] = []
        self._all: list[_Ring] = []
        self._free.append(self._new_ring())     # fail here, at open, if io_uring is unavailable
        self.files = FileSet(self.paths, direct)
        self.files.open()
        self.reason = self.files.buffered_reason
        self.stats = IoStats(depth_now=self._inflight)

    @property
    def direct(self) -> bool:
        return self.files.direct and not self.files.buffered_reason

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth = max(1, min(int(n), RING_ENTRIES))

    def _new_ring(self) -> _Ring:
        ring = _Ring(self._mod, self.queue_depth, self.staging, self.chunk)
        with self._lock:
            self._all.append(ring)
        return ring

    def _inflight(self) -> int:
        with self._lock:
            return sum(r.inflight() for r in self._all)

    def _take(self) -> _Ring:
        with self._lock:
            if self._free:
                return self._free.pop()
        return self._new_ring()

    def read(self, jobs: Sequence[ReadJob]) -> None:
        reqs: list[tuple[ReadJob, Span]] = [(j, p) for j in jobs for s in j.spans for p in split(s, self.chunk)]
        if not reqs:
            return
        results = self._submit([s for _, s in reqs])
        redo: list[tuple[ReadJob, Span, int]] = []
        refused: set[int] = set()
        for (job, s), got in zip(reqs, results):
            if got == -errno.EINVAL and self.files.direct:
                refused.add(s.file)
                redo.append((job, s, 0))
            elif got < 0:
                job.error = job.error or OSError(-got, os.strerror(-got), str(self.paths[s.file]))
            elif got < s.need:
                redo.append((job, s, got))
        for f in refused:
            # O_DIRECT refused by this filesystem at read time: reopen buffered, finish with preads.
            self.files.to_buffered(f, "O_DIRECT read refused (EINVAL)")
            self.reason = self.files.buffered_reason
        for job, s, got in redo:
            if job.error is None:
                self._finish(job, s, got)

    def _finish(self, job: ReadJob, s: Span, got: int) -> None:
        """Complete a short (or refused) request with plain preads; a file that ends early is an error."""
        fd = self.files.fds[s.file]
        try:
            while got < s.need:
                n = os.preadv(fd, [s.dest[got:]], s.offset + got)
                if n <= 0:
                    raise ShortRead(self.paths[s.file], s.offset, got, s.need)
                got += n
        except OSError as e:
            job.error = e

    def _submit(self, spans: list[Span]) -> list[int]:
        n = len(spans)
        ring = self._take()
        ffi, lib = ring.ffi, ring.lib
        try:
            views = [ffi.from_buffer(s.dest, require_writable=True) for s in spans]
            fds = ffi.new("int32_t[]", [self.files.fds[s.file] for s in spans])
            offs = ffi.new("uint64_t[]", [s.offset for s in spans])
            lens = ffi.new("uint32_t[]", [s.length for s in spans])
            dests = ffi.new("char *[]", views)
            res = ffi.new("int32_t[]", n)
            lat = ffi.new("uint64_t[]", n)
            depth = ffi.new("uint32_t[]", n)
            staging = ring.staging if ring.n_staging else ffi.NULL
            rc = lib.mer_ring_read(ring.ptr, n, fds, offs, dests, lens, res, lat, depth, self.queue_depth,
                                   staging, ring.n_staging)
            out = list(res)
            self.stats.batch(list(depth), [max(0, r) for r in out], [t / 1e9 for t in lat])
            del views
        except BaseException:
            ring.free()
            raise
        if rc < 0:   # the ring broke: drop it, a fresh one serves the next batch
            ring.free()
            with self._lock:
                self._all.remove(ring)
        else:
            with self._lock:
                self._free.append(ring)
        return out

    def close(self) -> None:
        with self._lock:
            for r in self._all:
                r.free()
            self._all, self._free = [], []
        self.files.close()


__all__ = ["UringReader"]
