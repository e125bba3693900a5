"""Fixtures and helpers shared by the streaming tests (store, io, cache, streaming)."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.io import Reader, ReadJob

IDS = [3, 17, 5, 42, 8, 21, 1, 33, 12, 7, 60, 2]


@pytest.fixture(scope="session")
def mixtral_bf16(checkpoint_dir) -> Path:
    """The tiny random Mixtral of tests/checkpoints.py in bf16 (the usual format of real MoE checkpoints)."""
    return checkpoint_dir("mixtral", "bfloat16")


@pytest.fixture(scope="session")
def tiny_store(mixtral_bf16, tmp_path_factory) -> Path:
    """mixtral_bf16 converted into an expert store."""
    from mer_tui.convert import convert_checkpoint

    dst = tmp_path_factory.mktemp("stores") / "mixtral-bf16"
    convert_checkpoint(mixtral_bf16, dst)
    return dst


@pytest.fixture(scope="session")
def reference(mixtral_bf16):
    """Logits and greedy tokens of the all-in-RAM source: what every streaming setup must reproduce."""
    import engine

    with engine.load(mixtral_bf16) as m:
        return m.forward(IDS), list(m.generate(IDS[:4], max_new_tokens=12))


class FaultyReader(Reader):
    """Wraps a real reader; jobs whose tag is in `fail` get garbage written into their buffers and an
    EIO, `times` times per tag (None: always).  Counts the reads of each tag."""

    def __init__(self, inner: Reader, fail: set | None = None, times: int | None = None,
                 delay: Callable[[], None] | None = None):
        self.inner = inner
        self.name = inner.name
        self.paths = inner.paths
        self.stats = inner.stats
        self.reason = inner.reason
        self.fail = set(fail or ())
        self.times = times
        self.delay = delay
        self.failed: dict = {}
        self.reads: dict = {}
        self._lock = threading.Lock()

    @property
    def direct(self) -> bool:
        return self.inner.direct

    def read(self, jobs) -> None:
        if self.delay:
            self.delay()
        self.inner.read(jobs)
        for job in jobs:
            with self._lock:
                self.reads[job.tag] = self.reads.get(job.tag, 0) + 1
                n = self.failed.get(job.tag, 0)
                hit = job.tag in self.fail and (self.times is None or n < self.times)
                if hit:
                    self.failed[job.tag] = n + 1
            if hit:
                half = job.spans[0].dest
                half[: len(half) // 2] = b"\xff" * (len(half) // 2)   # a half-finished, scribbled read
                job.error = OSError(errno.EIO, "Input/output error (injected)", str(self.paths[0]))

    def close(self) -> None:
        self.inner.close()


def read_all(reader: Reader, jobs: list[ReadJob]) -> None:
    reader.read(jobs)
    for j in jobs:
        assert j.error is None, j.error


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def resident_pages(address: int, nbytes: int) -> int:
    """Pages of [address, address + nbytes) in RAM, by mincore (exact, whatever map holds them)."""
    vec = (ctypes.c_ubyte * -(-nbytes // mmap.PAGESIZE))()
    if _libc().mincore(address, nbytes, vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(v & 1 for v in vec)


def page_cache_pages(path: Path) -> tuple[int, int]:
    """(resident, total) pages of `path` in the page cache, by mincore on a fresh shared mapping."""
    libc = _libc()
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            resident = resident_pages(addr, size)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return resident, -(-size // mmap.PAGESIZE)


def drop_from_page_cache(path: Path) -> None:
    """Evict a file's clean pages (no root needed, unlike drop_caches, and nothing else is touched)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
