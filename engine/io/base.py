"""What every reader takes and gives: aligned spans to fill, per-job errors, shared I/O counters."""
from __future__ import annotations

import errno
import os
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Requests are as large as this: a bundle (3.5 MiB for OLMoE's experts in q4_0) is one request.
# Spreading a batch over the queue in 128 KiB-1 MiB requests read no faster on the work disk, and
# once read buffers sit in huge pages (buffers.read_buffer) larger requests read much faster there:
# 2-4 MiB 1.7-2.5 GB/s against 0.8-1.8 for 1 MiB (`python -m bench.disk_requests FILE`).  The block layer
# still cuts a request to the device's own limits (max_sectors_kb), so NVMe drives keep their
# internal parallelism; the queue depth still bounds how many requests are in flight.
CHUNK = 4 << 20
# MB/s is reported over this trailing window: long enough to be steady at 10 Hz polling.
RATE_WINDOW_S = 2.0


@dataclass
class Span:
    """One contiguous range of a file to land in `dest` (offset, length and dest aligned for O_DIRECT)."""

    file: int           # index into the reader's files
    offset: int
    length: int
    need: int           # bytes that must arrive; < length only where the aligned end runs past EOF
    dest: memoryview    # exactly `length` bytes


@dataclass
class ReadJob:
    """The spans of one bundle; `error` is set when any of them failed."""

    spans: list[Span]
    error: OSError | None = None
    tag: object = None  # the caller's key, for its own bookkeeping


class ShortRead(OSError):
    """Fewer bytes than needed came back: the file shrank (truncated) after it was opened."""

    def __init__(self, path: Path, offset: int, got: int, need: int):
        super().__init__(errno.EIO, f"short read at offset {offset}: got {got} of {need} bytes "
                                    f"(file truncated?)", str(path))


def split(span: Span, chunk: int = CHUNK) -> list[Span]:
    """A span as requests of at most `chunk` bytes (chunk is a multiple of the alignment)."""
    if span.length <= chunk:
        return [span]
    out = []
    for a in range(0, span.length, chunk):
        n = min(chunk, span.length - a)
        need = max(0, min(n, span.need - a))
        out.append(Span(span.file, span.offset + a, n, need, span.dest[a:a + n]))
    return out


class IoStats:
    """Counters shared by a reader's threads; snapshot() is cheap and thread-safe."""

    def __init__(self, depth_now: Callable[[], int] | None = None):
        self._lock = threading.Lock()
        self._depth_now = depth_now
        self.inflight = 0
        self._reading = 0        # read() calls under way, from any thread
        self._busy_from = 0.0
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.bytes = 0
            self.request_s = 0.0     # the requests' latencies summed: / a span = mean requests in flight
            self.depth_max = 0
            self._depth_sum = 0
            self._lat_ms: deque[float] = deque(maxlen=2048)
            self._done: deque[tuple[float, int, float]] = deque()   # (when, bytes, seconds) a request
            self._since = time.monotonic()
            self._busy_s = 0.0
            self._busy_recent: deque[tuple[float, float]] = deque()   # busy spans ended in the window
            if self._reading:
                self._busy_from = self._since

    # Busy time: how long at least one read was under way.  With the bytes read, it gives the speed
    # the disk delivered while it had work, and the share of a decode during which it had none.
    def read_began(self) -> None:
        with self._lock:
            if not self._reading:
                self._busy_from = time.monotonic()
            self._reading += 1

    def read_ended(self) -> None:
        with self._lock:
            self._reading -= 1
            if not self._reading:
                now = time.monotonic()
                self._busy_s += now - self._busy_from
                self._busy_recent.append((self._busy_from, now))
                while self._busy_recent and self._busy_recent[0][1] < now - RATE_WINDOW_S:
                    self._busy_recent.popleft()

    # pread-style readers: one request at a time per thread
    def started(self) -> int:
        with self._lock:
            self.inflight += 1
            d = self.inflight + (self._depth_now() if self._depth_now else 0)
            self.depth_max = max(self.depth_max, d)
            self._depth_sum += d
            return d

    def finished(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.inflight -= 1
            self._add(nbytes, seconds)

    # uring-style readers: a whole batch reported after it completes
    def batch(self, depths: Sequence[int], sizes: Sequence[int], seconds: Sequence[float]) -> None:
        with self._lock:
            if depths:
                self.depth_max = max(self.depth_max, max(depths))
                self._depth_sum += sum(depths)
            for n, s in zip(sizes, seconds):
                self._add(n, s)

    def _add(self, nbytes: int, seconds: float) -> None:
        now = time.monotonic()
        self.requests += 1
        self.bytes += nbytes
        self.request_s += seconds
        self._lat_ms.append(seconds * 1e3)
        self._done.append((now, nbytes, seconds))
        while self._done and self._done[0][0] < now - RATE_WINDOW_S:
            self._done.popleft()

    def snapshot(self) -> dict:
        with self._lock:
            now = time.monotonic()
            while self._done and self._done[0][0] < now - RATE_WINDOW_S:
                self._done.popleft()
            span = min(RATE_WINDOW_S, max(now - self._since, 1e-3))
            lat = sorted(self._lat_ms)
            depth = self.inflight + (self._depth_now() if self._depth_now else 0)
            busy = self._busy_s + (now - self._busy_from if self._reading else 0.0)
            # the share of the trailing window during which a read was under way, as mb_s is its bytes
            start = now - span
            spans = list(self._busy_recent) + ([(self._busy_from, now)] if self._reading else [])
            recent = sum(max(0.0, e - max(b, start)) for b, e in spans)
            return {
                "busy_s": busy,
                "busy": min(1.0, recent / span),
                "requests": self.requests,
                "request_s": self.request_s,
                "bytes": self.bytes,
                "mb_s": sum(n for _, n, _ in self._done) / span / 1e6,
                "queue_depth": depth,
                # requests in flight on average over the window, as iostat's aqu-sz: their summed
                # latencies over its length (Little's law).  Sampled at 10 Hz, the depth at an
                # instant misses reads shorter than the interval; this counts every one.
                "queue_depth_avg": sum(t for _, _, t in self._done) / span,
                "queue_depth_max": self.depth_max,
                "queue_depth_mean": self._depth_sum / self.requests if self.requests else 0.0,
                "read_ms_p50": _pct(lat, 0.50),
                "read_ms_p99": _pct(lat, 0.99),
            }


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class Reader(ABC):
    """Fills spans of a fixed list of files.  read() may be called from several threads at once."""

    name: str = "?"

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = [Path(p) for p in paths]
        self.stats = IoStats()
        #: why this reader (and mode) was chosen; shown in telemetry as io.backend_reason
        self.reason = ""

    @abstractmethod
    def read(self, jobs: Sequence[ReadJob]) -> None:
        """Fill every span of every job, all requests in flight together; set job.error on failure."""

    @property
    def direct(self) -> bool:
        """Whether reads bypass the page cache (O_DIRECT)."""
        return False

    def close(self) -> None:
        """Release files, threads and rings."""


def open_fd(path: Path, direct: bool) -> int:
    """A read-only descriptor; with O_DIRECT when asked (EINVAL there means the filesystem refuses it)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    return os.open(path, flags)


@dataclass
class FileSet:
    """Descriptors of a reader's files, switched to buffered reads where O_DIRECT is refused."""

    paths: list[Path]
    direct: bool
    fds: list[int] = field(default_factory=list)
    buffered_reason: str = ""
    buffered: set[int] = field(default_factory=set)
    _retired: list[int] = field(default_factory=list)

    def open(self) -> None:
        for p in self.paths:
            try:
                self.fds.append(open_fd(p, self.direct))
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                self.buffered.add(len(self.fds))
                self.fds.append(open_fd(p, False))
                self.buffered_reason = f"{p}: the filesystem refuses O_DIRECT (EINVAL); buffered reads"

    def to_buffered(self, i: int, why: str) -> int:
        """Reopen file i without O_DIRECT after a read refused it; the old descriptor stays open until
        close() because another thread may be mid-read on it."""
        if i in self.buffered:
            return self.fds[i]
        old = self.fds[i]
        fd = open_fd(self.paths[i], False)
        self.fds[i] = fd
        self.buffered.add(i)
        self._retired.append(old)
        self.buffered_reason = f"{self.paths[i]}: {why}; buffered reads"
        return fd

    def close(self) -> None:
        for fd in self.fds + self._retired:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds, self._retired = [], []
